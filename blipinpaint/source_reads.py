"""Reading a listed input's encoded image: the stage after `sources` lists the inputs.

`read_files` takes a batch of items (`sources.items_to_batch`) and reads each one's bytes
where its listing points: a whole file (through its raw bytes, `raw_path`, when its local
name is not UTF-8), `size` bytes at `offset` of a tar shard (one ranged read), or the image
cell of a Parquet row (each row group a batch needs read once). Local paths and URIs go
through pyarrow's filesystems. A read that fails, or an input over
`data.max_file_mb`, becomes an error row. Kept apart from the listing: a job lists once (on the
driver, or a shard group in each of its read tasks: `source_pages`) and reads in every
batch's CPU task.

A Parquet reader decodes a page whole: a cell cannot be read without its page, nor a page
without the pages before it in its column chunk (and the chunk's dictionary page). A row
group whose image column is within the limit is read whole; a larger one has its page headers
read first (a few bytes each, never a page), then its rows one at a time up to the last one
wanted: a page that would bring more than the limit into memory is never read, and the rows
that need it are error rows that say so.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from blipinpaint.storage import filesystem


def _open(source: str, raw_path: bytes):
    """A readable file: through its raw bytes (a local name that is not UTF-8), else pyarrow."""
    if raw_path:
        return open(raw_path, "rb")
    fs, path = filesystem(source)
    return fs.open_input_stream(path)


def _cell_bytes(value) -> bytes | None:
    """An image cell: bytes, or Hugging Face's `{bytes, path}` struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, bytes) else None  # b"": the decoder's `empty file`


# A page of several cells may take up to this many data.max_file_mb (a proposed
# `data.max_page_mb`): pyarrow writes up to 1024 cells in a page, so its row groups of up to
# 1024 images are one page each (the dictionary page, by default), and a cell just over the
# limit beside a few that are not must not cost them their rows. A page of one cell is that
# cell: it takes at most data.max_file_mb.
PAGE_FILES = 4
READ_BUFFER = 1 << 20  # a column chunk streams through a buffer this large: a page at a time, not the chunk
HEADER_MAX = 1 << 20  # a page header is a few bytes (statistics at most a few kB): larger is not one
DICTIONARY_PAGE = 2
DATA_PAGES = (0, 3)  # v1, v2


class _Thrift:
    """Just enough of Thrift's compact protocol to read a Parquet page header (parquet.thrift's
    `PageHeader`) and skip the fields it does not need. Hostile bytes end in `ValueError`, or
    `EOFError` where more bytes may complete the header."""

    I32, STRUCT = 5, 12

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise EOFError
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        out = shift = 0
        while shift < 64:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
        raise ValueError("a varint longer than 64 bits")

    def int(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)  # zigzag

    def fields(self):
        """(field id, type) of each field of the struct at hand, up to its stop byte; the caller
        reads or `skip`s each value."""
        field = 0
        while head := self.byte():
            kind, delta = head & 15, head >> 4
            field = field + delta if delta else self.int()
            yield field, kind

    def skip(self, kind: int, depth: int = 0) -> None:
        if depth > 32:
            raise ValueError("structs nested deeper than 32")
        if kind in (1, 2):  # booleans: the value is in the type
            return
        if kind == 3:
            self.byte()
        elif kind in (4, 5, 6):
            self.varint()
        elif kind == 7:
            self.take(8)
        elif kind == 8:
            self.take(self.varint())
        elif kind in (9, 10):  # list, set
            head = self.byte()
            n = head >> 4 if head >> 4 != 15 else self.varint()
            for _ in range(n):
                self.byte() if head & 15 in (1, 2) else self.skip(head & 15, depth + 1)
        elif kind == 11:  # map
            n = self.varint()
            types = self.byte() if n else 0
            for _ in range(n):
                for t in (types >> 4, types & 15):
                    self.byte() if t in (1, 2) else self.skip(t, depth + 1)
        elif kind == self.STRUCT:
            for _, t in self.fields():
                self.skip(t, depth + 1)
        else:
            raise ValueError(f"Thrift type {kind} does not exist")

    def take(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise EOFError
        self.pos += n


def _page_header(data: bytes) -> tuple[int, int, int, int, int]:
    """(page type, uncompressed size, compressed size, cells, header length) from the bytes at
    a page's start. Cells: a dictionary page's entries, a data page's rows (its values, for a
    column that is not repeated)."""
    thrift, got = _Thrift(data), {}
    for field, kind in thrift.fields():
        if field in (1, 2, 3) and kind == thrift.I32:  # type, uncompressed size, compressed size
            got[field] = thrift.int()
        elif field in (5, 7, 8) and kind == thrift.STRUCT:  # data page v1, dictionary page, data page v2
            for sub, subkind in thrift.fields():
                if sub == (3 if field == 8 else 1) and subkind == thrift.I32:  # v2: num_rows; else num_values
                    got["cells"] = thrift.int()
                else:
                    thrift.skip(subkind)
        else:
            thrift.skip(kind)
    if not {1, 2, 3} <= set(got) or min(got.values()) < 0:
        raise ValueError(f"not a page header: {got}")
    return got[1], got[2], got[3], got.get("cells", 0), thrift.pos


def _pages(f, start: int, length: int):
    """(type, size, cells) of each page of the column chunk at `start`: the headers read, a
    small read each, never a page. The size is the larger of compressed and uncompressed (both
    are in memory while it is decompressed: `PAGE_FILES` leaves room for that)."""
    pos, end = start, start + length
    while pos < end:
        window = 4096
        while True:
            data = f.read_at(min(window, end - pos), pos)
            try:
                kind, uncompressed, compressed, cells, header = _page_header(data)
                break
            except EOFError:
                if len(data) < window or window >= HEADER_MAX:
                    raise ValueError(f"the page header at byte {pos} is cut short or over 1 MB") from None
                window *= 16
        yield kind, max(uncompressed, compressed), cells
        pos += header + compressed


def _allowance(cells: int, limit: int) -> int:
    """The most a page of `cells` cells may take: `limit` for one cell, `PAGE_FILES` x `limit`
    for several, plus the page's own bytes beside its cells' (a 4-byte length each, the levels,
    the codec's framing: under 1% on bytes that do not compress)."""
    most = (PAGE_FILES if cells > 1 else 1) * limit
    return most + most // 100 + 4 * cells + 4096


def _unreadable(f, meta, group: int, column: str, limit: int, last: int) -> dict[int, str] | None:
    """None when row group `group`'s `column` is within `limit` (it may be read whole). Else the
    rows (numbered within the group) that cannot be read without a page over the limit, each
    with the reason: a page of one cell over `limit` (that cell), or a page of several cells
    over `PAGE_FILES * limit` (see `_allowance`); then the rows that need that page too (those
    after it in the column chunk, or all of them for a dictionary page). The headers are read
    up to row `last` only: the batch wants no row after it."""
    rows = meta.row_group(group).num_rows
    limits = f"data.max_file_mb={limit / 2**20:g} MB"
    out: dict[int, str] | None = None
    for leaf in range(meta.num_columns):
        path = meta.schema.column(leaf).path
        if path != column and not path.startswith(column + "."):
            continue
        chunk = meta.row_group(group).column(leaf)
        if max(chunk.total_uncompressed_size, chunk.total_compressed_size) <= limit:
            continue  # nothing in it can be over the limit: no need to look
        if out is None:
            out = {}
        starts = [chunk.data_page_offset] + [chunk.dictionary_page_offset] * bool(chunk.has_dictionary_page)
        repeated = meta.schema.column(leaf).max_repetition_level > 0  # its values are not rows: all or none
        row = 0
        for kind, size, cells in _pages(f, min(o for o in starts if o), chunk.total_compressed_size):
            if kind not in DATA_PAGES and kind != DICTIONARY_PAGE:
                continue  # an index page: never read
            if size <= _allowance(cells, limit):
                row += cells if kind in DATA_PAGES else 0
                if row > last:
                    break
                continue
            page = f"{size / 2**20:.1f} MB"
            inside = range(rows) if kind == DICTIONARY_PAGE or repeated else range(row, min(row + cells, rows))
            for r in range(inside.start, rows):
                if r not in inside:
                    why = f"reading it means decoding row {row}'s {page} page first, more than {limits}"
                elif len(inside) == 1 and cells == 1:
                    why = f"its cell is {page}, more than {limits}"
                else:
                    pages = (f"its row group's {cells} cells are one {page} dictionary page" if kind == DICTIONARY_PAGE
                             else f"its page of {cells} cells is {page}")
                    why = f"{pages}, more than the {PAGE_FILES} x {limits} a page may take; write smaller row groups"
                out.setdefault(r, why)
            break
    return out


def _read_cells(batch: dict[str, np.ndarray], wanted: list[int], column: str,
                max_mb: float | None) -> dict[int, bytes | str]:
    """The image cells of the rows `wanted` (Parquet items). A row's value is its bytes, or the
    reason it has none. A row group whose image column is over the limit is streamed a row at
    a time, up to the last row wanted from it, past no page over the limit."""
    limit = int(max_mb * 2**20) if max_mb is not None else -1
    by_file = defaultdict(list)
    for i in wanted:
        by_file[batch["file"][i]].append(i)
    out: dict[int, bytes | str] = {}
    for file, rows in by_file.items():
        fs, path = filesystem(file)
        try:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)  # pre-buffered: a column chunk read whole takes one request
                meta = parquet.metadata
                starts = np.cumsum([0] + [meta.row_group(number).num_rows for number in range(meta.num_row_groups)])
                groups = defaultdict(lambda: defaultdict(list))  # group -> row in it -> batch indices
                for i in rows:
                    group = int(np.searchsorted(starts, batch["row"][i], side="right") - 1)
                    groups[group][int(batch["row"][i] - starts[group])].append(i)
                for group, members in sorted(groups.items()):
                    blocked = _unreadable(f, meta, group, column, limit, max(members)) if limit >= 0 else None
                    for row in sorted(set(members) & set(blocked or ())):
                        out.update({i: f"too large: {file} row {starts[group] + row}: {blocked[row]}"
                                    for i in members.pop(row)})
                    for row, value in _cells(f, parquet, group, column, set(members), whole=blocked is None):
                        if value is None:
                            value = f"bad cell: {file} row {starts[group] + row}: {column!r} holds no image bytes"
                        elif 0 <= limit < len(value):
                            value = f"too large: more than data.max_file_mb={max_mb:g} MB"
                        out.update({i: value for i in members[row]})
        except (OSError, ValueError, pa.ArrowException) as err:
            out.update({i: f"read failed: {file}: {err}" for i in rows if i not in out})
    return out


def _cells(f, parquet, group: int, column: str, rows: set[int], whole: bool):
    """(row, cell bytes or None) of each of `rows` of row group `group` of the open Parquet file
    `f`: the column read `whole`, or else a row at a time up to the last of `rows`, so a read
    holds the pages needed for one cell (the pages after it are never read)."""
    if not rows:
        return
    if whole:
        cells = parquet.read_row_group(group, columns=[column]).column(0)
        yield from ((row, _cell_bytes(cells[row].as_py())) for row in sorted(rows))
        return
    # Not pre-buffered (pyarrow's default would read the whole column chunk first): the pages
    # stream through a small buffer, read as the rows need them.
    stream = pq.ParquetFile(f, metadata=parquet.metadata, buffer_size=READ_BUFFER, pre_buffer=False)
    last, row = max(rows), 0
    for part in stream.iter_batches(batch_size=1, row_groups=[group], columns=[column], use_threads=False):
        cells = part.column(0)
        for k in range(len(cells)):
            if row + k in rows:
                yield row + k, _cell_bytes(cells[k].as_py())
        row += len(cells)
        if row > last:
            return


def _read_range(file: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of `file` (a shard member): one ranged read."""
    fs, path = filesystem(file)
    with fs.open_input_file(path) as f:
        data = f.read_at(size, offset)
    if len(data) < size:
        raise OSError(f"{file} ends {size - len(data)} bytes into the member at byte {offset}")
    return data


def read_files(batch: dict[str, np.ndarray], max_mb: float | None = None,
               image_column: str = "image") -> dict[str, np.ndarray]:
    """Stage: each input's encoded image -> `bytes` (a file, a shard member's byte range, or a
    Parquet cell); one that cannot be read, or is over `max_mb`, is an error row.

    Of a file or a shard member, at most `max_mb` MB and one byte are read; of a Parquet file,
    no page over `max_mb` (a page of one cell) or `PAGE_FILES` x `max_mb` (of several): a huge
    input never fills a worker's memory.
    """
    errors = np.array(batch["error"], dtype=object)
    n = len(errors)
    data = np.full(n, b"", dtype=object)
    raw_paths = batch.get("raw_path", [b""] * n)
    offsets, sizes, rows = (batch.get(k, [-1] * n) for k in ("offset", "size", "row"))
    limit = int(max_mb * 2**20) if max_mb is not None else -1
    cells = _read_cells(batch, [i for i in range(n) if not errors[i] and rows[i] >= 0], image_column, max_mb)
    for i, (source, raw) in enumerate(zip(batch["source"], raw_paths)):
        if errors[i]:
            continue
        if 0 <= limit < sizes[i]:
            errors[i] = f"too large: more than data.max_file_mb={max_mb:g} MB"
            continue
        try:
            if i in cells:
                if isinstance(cells[i], str):
                    errors[i] = cells[i]
                    continue
                data[i] = cells[i]
            elif offsets[i] >= 0:
                data[i] = _read_range(batch["file"][i], int(offsets[i]), int(sizes[i]))
            else:
                with _open(source, raw) as f:
                    data[i] = f.read(limit + 1) if limit >= 0 else f.read()
        except (OSError, ValueError) as err:  # missing, unreadable, or a path the filesystem refuses
            errors[i] = f"read failed: {err}"
            continue
        if 0 <= limit < len(data[i]):
            data[i] = b""
            errors[i] = f"too large: more than data.max_file_mb={max_mb:g} MB"
    return {**batch, "bytes": data, "error": errors}
