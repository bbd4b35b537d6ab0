"""The commit log as columns: what a checkpoint file holds and what a reader gets.

A marker (`_commits/<part>.json`) holds its part's ids as JSON lists; 10^7 ids parsed into
Python strings take seconds and gigabytes (7.9 s, 2.5 GB here: BENCHMARKS.md). A checkpoint
holds them as Parquet columns instead, read into Arrow arrays in a few hundred milliseconds,
and a reader asks Arrow compute what it needs (`pc.is_in`, counts) without a Python object
per id. One Parquet file, two kinds of rows: first one row per part (`part`, and `marker`:
the marker's other fields as JSON, and `placed`: whether the compaction that wrote the file
found the part's data files in place, in row groups of their own), then one row per id
(`part`, `id`, `error_kind`: null for a sample). `LogView` is the log as a reader found it:
the parts' fields, one table of ids, and the parts a compaction here found in place;
`log_view` makes it from the checkpoints and markers read (`blipinpaint.checkpoints`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMAT = "blipinpaint.commit-checkpoint/3"  # Parquet with `placed`; /2 had none, /1 was gzipped JSON
READS = (FORMAT, "blipinpaint.commit-checkpoint/2")  # the Parquet formats read (a /2 file: nothing placed)
ID_SCHEMA = pa.schema([("part", pa.dictionary(pa.int32(), pa.string())), ("id", pa.string()),
                       ("error_kind", pa.dictionary(pa.int32(), pa.string()))])
FILE_SCHEMA = ID_SCHEMA.append(pa.field("marker", pa.string())).append(pa.field("placed", pa.bool_()))
ID_FIELDS = ("samples", "errors", "error_kinds")  # a marker's fields that go to the id rows


def marker_rows(markers: list[dict]) -> pa.Table:
    """The id rows of whole markers (samples first, then errors, each in the marker's order)."""
    part, ids, kinds = [], [], []
    for m in markers:
        n = len(m["samples"]) + len(m["errors"])
        part += [m["name"]] * n
        ids += [*m["samples"], *m["errors"]]
        kinds += [None] * len(m["samples"]) + list(m["error_kinds"])
    return pa.table([pa.array(part, pa.string()).dictionary_encode(), pa.array(ids, pa.string()),
                     pa.array(kinds, pa.string()).dictionary_encode()], schema=ID_SCHEMA)


def fields(marker: dict) -> dict:
    """A marker's fields but its ids (what one part row holds)."""
    return {k: v for k, v in marker.items() if k not in ID_FIELDS}


def part_mask(column: pa.ChunkedArray, names: set[str]) -> pa.ChunkedArray:
    """Which rows of a dictionary-encoded `part` column belong to the parts named: looked up
    once per distinct part (the dictionary), not once per row."""
    value_set = pa.array(sorted(names), pa.string())
    return pa.chunked_array([pc.take(pc.is_in(chunk.dictionary, value_set=value_set), chunk.indices)
                             for chunk in column.chunks], pa.bool_())


def encode(info: dict, parts: list[dict], ids: pa.Table, placed: set[str]) -> bytes:
    """A checkpoint's bytes: `info` (format, seq, merged, folder, ...) in the file's metadata,
    the part rows (with whether each is in `placed`), then the id rows."""
    schema = FILE_SCHEMA.with_metadata({"blipinpaint": json.dumps({**info, "parts": len(parts)}, sort_keys=True)})
    names = pa.array([p["name"] for p in parts], pa.string())
    part_rows = pa.table([names.dictionary_encode(), pa.nulls(len(parts), pa.string()),
                          pa.nulls(len(parts), ID_SCHEMA.field("error_kind").type),
                          pa.array([json.dumps(p, sort_keys=True) for p in parts], pa.string()),
                          pa.array([p["name"] in placed for p in parts], pa.bool_())], schema=schema)
    id_rows = ids.append_column("marker", pa.nulls(ids.num_rows, pa.string()))
    id_rows = id_rows.append_column("placed", pa.nulls(ids.num_rows, pa.bool_())).cast(schema)
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        writer.write_table(part_rows, row_group_size=max(1, len(parts)))  # row groups of their own
        writer.write_table(id_rows, row_group_size=1 << 20)
    return sink.getvalue()


def decode(data: bytes) -> tuple[dict, list[dict], pa.Table]:
    """A checkpoint's metadata (with `placed`, the set of the part names flagged so), part rows
    and id rows (what `encode` wrote)."""
    f = pq.ParquetFile(pa.BufferReader(data))
    info = json.loads(f.schema_arrow.metadata[b"blipinpaint"])
    groups, rows = 0, 0
    while rows < info["parts"]:
        rows += f.metadata.row_group(groups).num_rows
        groups += 1
    if rows != info["parts"]:
        raise ValueError(f"{rows} part rows, the metadata says {info['parts']}")
    columns = ["marker", "placed"] if "placed" in f.schema_arrow.names else ["marker"]  # /2 has no `placed`
    part_rows = f.read_row_groups(range(groups), columns=columns) if groups else None
    parts = [json.loads(p) for p in part_rows.column("marker").to_pylist()] if groups else []
    flags = part_rows.column("placed").to_pylist() if groups and "placed" in columns else [False] * len(parts)
    info["placed"] = {p["name"] for p, flag in zip(parts, flags) if flag}
    ids = f.read_row_groups(range(groups, f.num_row_groups), columns=list(ID_SCHEMA.names))
    return info, parts, ids.cast(ID_SCHEMA)


@dataclass
class LogView:
    """The log as one read found it: the parts in effect (name -> their fields but ids), the
    rows of their ids, and the names it listed (loose markers, checkpoints)."""

    parts: dict[str, dict]
    ids: pa.Table
    loose: set[str] = field(default_factory=set)
    checkpoints: set[str] = field(default_factory=set)
    unique: bool | None = None  # no id in two parts, when known without hashing every id
    placed: set[str] = field(default_factory=set)  # parts a compaction in this folder found in place
    disjoint: list[pa.ChunkedArray] | None = None  # else columns each without a repeated id: none shared?

    def id_array(self) -> pa.Array:
        column = self.ids.column("id")
        return column.combine_chunks() if column.num_chunks else pa.array([], pa.string())

    def duplicates(self) -> int:
        """Rows beyond an id's first (0 without hashing every id when `unique` says so, or
        when the columns of `disjoint` share none: checked here, when asked)."""
        if self.unique is None and self.disjoint:
            self.unique, self.disjoint = disjoint(self.disjoint), None
        if self.unique:
            return 0
        return self.ids.num_rows - pc.count_distinct(self.ids.column("id"), mode="all").as_py()

    def with_samples(self) -> set[str]:
        kind = self.ids.column("error_kind")
        return set(pc.unique(pc.filter(self.ids.column("part"), pc.is_null(kind))).cast(pa.string()).to_pylist())

    def only(self, names: set[str]) -> LogView:
        """The view of the parts named (all when they are all here)."""
        if names >= set(self.parts):
            return self
        return LogView({n: p for n, p in self.parts.items() if n in names},
                       self.ids.filter(part_mask(self.ids.column("part"), names)), self.loose, self.checkpoints,
                       self.unique, self.placed & names, self.disjoint)

    def markers(self) -> list[dict]:
        """Whole markers in name order: a Python object per id (for small logs and callers)."""
        out = {name: {**p, "samples": [], "errors": [], "error_kinds": []} for name, p in self.parts.items()}
        columns = [self.ids.column(c).to_pylist() for c in ("part", "id", "error_kind")]
        for part, i, kind in zip(*columns):
            m = out[part]
            if kind is None:
                m["samples"].append(i)
            else:
                m["errors"].append(i)
                m["error_kinds"].append(kind)
        return [out[name] for name in sorted(out)]


def log_view(sources: dict[str, tuple[dict, list[dict], pa.Table]], markers: list[dict], skip: set[str],
             loose: set[str], here: str) -> LogView:
    """The log from its checkpoints (by name, so in `seq` order) and loose markers: a loose
    marker wins, then the copy in the checkpoint of the highest `seq`, then (two of one
    `seq`: two writers' folds at once) the copy committed last; the parts in `skip` are left
    out. A checkpoint that another one present merged is not read: that one holds all its
    parts but those a removal dropped (a removal cut short before it deleted the older
    file). A part is `placed` when the checkpoint it is read from found it in place in this
    folder (`here`) and no loose marker is newer. Whether an id is in two parts is known
    without hashing every id when every checkpoint says its own ids are distinct: then the
    files are checked against one another (`disjoint`)."""
    checkpoints = set(sources)
    superseded = {name for info, _, _ in sources.values() for name in info["merged"]}
    sources = [content for name, content in sources.items() if name not in superseded]
    owner = {p["name"]: k for k, (_, parts, _) in enumerate(sources) for p in parts}  # the highest `seq`
    # Of checkpoints of one `seq` (two writers' folds at once, each listing the same checkpoints),
    # the copy committed last (then the last name): a merge by one of the writers lifts older
    # copies to its fold's `seq`. Only the parts of such checkpoints are looked at.
    seqs = [info["seq"] for info, _, _ in sources]
    for seq in {s for s in seqs if seqs.count(s) > 1}:
        tied = [k for k, s in enumerate(seqs) if s == seq]
        newest = {}
        for k in tied:
            for p in sources[k][1]:
                newest[p["name"]] = max(newest.get(p["name"], ()), (p.get("committed_at") or 0.0, k))
        owner |= {name: k for name, (_, k) in newest.items() if owner[name] in tied}
    owner |= {m["name"]: len(sources) for m in markers}
    parts, tables, placed = {}, [], set()
    for k, (info, fields_, ids) in enumerate(sources):
        won = {p["name"] for p in fields_ if owner[p["name"]] == k and p["name"] not in skip}
        parts |= {p["name"]: p for p in fields_ if p["name"] in won}
        tables.append(ids if len(won) == len(fields_) else ids.filter(part_mask(ids.column("part"), won)))
        if info.get("folder") == here:  # flags found in another folder (a checkpoint copied here) say nothing
            placed |= info["placed"] & won
    parts |= {m["name"]: fields(m) for m in markers}
    loose_rows = marker_rows(markers)
    loose_ids = loose_rows.column("id").to_pylist()
    unique, columns = None, None
    if len(set(loose_ids)) < len(loose_ids):
        unique = False
    elif not sources:
        unique = True
    elif all(info.get("unique") for info, _, _ in sources):  # each file's ids distinct: across files?
        columns = [t.column("id") for t in tables] + [loose_rows.column("id")]  # (checked when asked)
    ids = pa.concat_tables([*tables, loose_rows]) if tables else loose_rows
    return LogView(dict(sorted(parts.items())), ids, loose, checkpoints, unique, placed, columns)


def disjoint(columns: list[pa.ChunkedArray]) -> bool:
    """Whether columns each without a repeated id share none: from the smallest up, each is
    hashed once (`pc.is_in`'s value set) and the larger ones are looked up in it; the
    largest is never hashed (`count_distinct` took several times as long here)."""
    columns = sorted((c for c in columns if len(c)), key=len, reverse=True)
    while len(columns) > 1:
        smallest = columns.pop().combine_chunks()
        larger = pa.chunked_array([chunk for c in columns for chunk in c.chunks], pa.string())
        if pc.any(pc.is_in(larger, value_set=smallest)).as_py():
            return False
    return True
