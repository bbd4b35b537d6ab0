"""Exactly-once Parquet output: staged files, a commit marker, then the move into place.

Layout under the output folder (local or s3://):

    samples/<name>.parquet   errors/<name>.parquet   the data; only committed files appear here
    _commits/<name>.json     the commit marker: the ids in <name>, per-stage timings and retries
    _staging/...             files being written; never read as data

A part is committed when its marker exists. The marker is written after the staged files
and before they are moved, so `recover()` can always finish or undo a part interrupted at
any point: it moves the staged files of committed parts into place (roll forward) and
deletes staged files with no marker (roll back). The part name is a hash of its ids, so a
retried write of the same rows replaces, never duplicates.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from blipinpaint.records import SAMPLE_SCHEMA, split_rows
from blipinpaint.storage import filesystem

DATA_DIRS = ("samples", "errors")


def part_name(ids: list[str]) -> str:
    digest = hashlib.blake2b("\n".join(sorted(ids)).encode(), digest_size=10).hexdigest()
    return f"part-{digest}"


class CommitLog:
    def __init__(self, out_dir: str, schema: pa.Schema = SAMPLE_SCHEMA):
        self.out_dir, self.schema = out_dir, schema
        self.fs, self.root = filesystem(out_dir)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def commit(self, table: pa.Table) -> dict:
        """Write one part (the rows of `table`, samples and errors) exactly once."""
        ids = table.column("id").to_pylist()
        name = part_name(ids)
        samples, errors = split_rows(table, self.schema)
        marker = {
            "name": name,
            "samples": samples.column("id").to_pylist(),
            "errors": errors.column("id").to_pylist(),
            "error_kinds": [e.split(":", 1)[0] for e in errors.column("error").to_pylist()],
            "seconds": {c[len("seconds_"):]: float(pc.sum(table.column(c)).as_py() or 0.0)
                        for c in table.column_names if c.startswith("seconds_")},
            "retries": {c[len("retries_"):]: int(pc.sum(table.column(c)).as_py() or 0)
                        for c in table.column_names if c.startswith("retries_")},
        }
        staged = []
        for folder, part in zip(DATA_DIRS, (samples, errors)):
            if part.num_rows:
                self.fs.create_dir(self._path("_staging", folder), recursive=True)
                pq.write_table(part, self._path("_staging", folder, f"{name}.parquet"), filesystem=self.fs)
                staged.append(folder)
        marker["files"] = staged
        self.fs.create_dir(self._path("_commits"), recursive=True)
        tmp = self._path("_commits", f".{name}.json.tmp")
        self._write_bytes(tmp, json.dumps(marker).encode())
        self.fs.move(tmp, self._path("_commits", f"{name}.json"))  # the commit point
        self._publish(name, staged)
        return marker

    def _publish(self, name: str, folders: list[str]) -> None:
        for folder in folders:
            staged = self._path("_staging", folder, f"{name}.parquet")
            if self.fs.get_file_info(staged).type == pafs.FileType.File:
                self.fs.create_dir(self._path(folder), recursive=True)
                self.fs.move(staged, self._path(folder, f"{name}.parquet"))

    def markers(self) -> list[dict]:
        selector = pafs.FileSelector(self._path("_commits"), allow_not_found=True)
        paths = [i.path for i in self.fs.get_file_info(selector)
                 if i.type == pafs.FileType.File and i.base_name.endswith(".json") and not i.base_name.startswith(".")]
        markers = []
        for path in sorted(paths):
            with self.fs.open_input_stream(path) as f:
                markers.append(json.loads(f.read()))
        return markers

    def recover(self) -> dict[str, int]:
        """Finish committed parts, undo uncommitted ones; return what was done."""
        markers = self.markers()
        committed = {m["name"] for m in markers}
        for marker in markers:
            self._publish(marker["name"], marker["files"])
        removed = 0
        for folder in (*DATA_DIRS, "_commits"):
            base = self._path("_staging", folder) if folder in DATA_DIRS else self._path("_commits")
            for info in self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
                stem = info.base_name.split(".")[0] if folder in DATA_DIRS else None
                orphan_data = folder in DATA_DIRS and stem not in committed
                orphan_marker = folder == "_commits" and info.base_name.endswith(".tmp")
                if info.type == pafs.FileType.File and (orphan_data or orphan_marker):
                    self.fs.delete_file(info.path)
                    removed += 1
        return {"committed_parts": len(markers), "orphans_removed": removed}

    def committed_samples(self) -> dict[str, list[str]]:
        """Part name -> the sample ids committed in it (from the markers: no data is read)."""
        return {m["name"]: m["samples"] for m in self.markers() if m["samples"]}

    def committed_ids(self) -> set[str]:
        return {i for m in self.markers() for i in (*m["samples"], *m["errors"])}
