"""Reading a listed input's encoded image: the stage after `sources` lists the inputs.

`read_files` takes a batch of items (`sources.items_to_batch`) and reads each one's bytes
where its listing points: a whole file (through its raw bytes, `raw_path`, when its local
name is not UTF-8), `size` bytes at `offset` of a tar shard (one ranged read), or the image
cell of a Parquet row (each row group a batch needs read once). Local paths and URIs go
through pyarrow's filesystems. A read that fails, or an input over `data.max_file_mb`,
becomes an error row. Kept apart from the listing: a job lists once, on the driver, and
reads in every batch's CPU task.
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


def _read_cells(batch: dict[str, np.ndarray], wanted: list[int], column: str) -> dict[int, bytes | str]:
    """The image cells of the rows `wanted` (Parquet items): each row group read once.
    A row's value is its bytes, or the reason it has none."""
    by_file = defaultdict(list)
    for i in wanted:
        by_file[batch["file"][i]].append(i)
    out: dict[int, bytes | str] = {}
    for file, rows in by_file.items():
        fs, path = filesystem(file)
        try:
            parquet = pq.ParquetFile(path, filesystem=fs)
            starts = np.cumsum([0] + [parquet.metadata.row_group(number).num_rows
                                      for number in range(parquet.num_row_groups)])
            groups = defaultdict(list)
            for i in rows:
                groups[int(np.searchsorted(starts, batch["row"][i], side="right") - 1)].append(i)
            for group, members in groups.items():
                cells = parquet.read_row_group(group, columns=[column]).column(0)
                for i in members:
                    value = _cell_bytes(cells[int(batch["row"][i] - starts[group])].as_py())
                    out[i] = value if value is not None else f"bad cell: {file} row {batch['row'][i]}: " \
                                                             f"{column!r} holds no image bytes"
        except (OSError, ValueError, pa.ArrowException) as err:
            out.update({i: f"read failed: {file}: {err}" for i in rows if i not in out})
    return out


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

    At most `max_mb` MB and one byte are read: a huge file never fills a worker's memory.
    """
    errors = np.array(batch["error"], dtype=object)
    n = len(errors)
    data = np.full(n, b"", dtype=object)
    raw_paths = batch.get("raw_path", [b""] * n)
    offsets, sizes, rows = (batch.get(k, [-1] * n) for k in ("offset", "size", "row"))
    limit = int(max_mb * 2**20) if max_mb is not None else -1
    cells = _read_cells(batch, [i for i in range(n) if not errors[i] and rows[i] >= 0], image_column)
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
