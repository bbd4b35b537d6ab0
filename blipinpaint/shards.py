"""The export's shards: the plan that cuts a run's committed rows into them, the writer of one
shard, and what each committed shard says about itself.

The plan depends on the committed rows alone (each split's parts by name, ids sorted), so a
rerun makes the same shards under the same names. A shard is written staged, moved into
place whole, and then committed in the export's commit log (`commit_log.CommitLog`): one part
per shard, a row per sample saying where it went. A shard that is not committed is written
again, byte for byte the same (`export_formats`); one that is, is never touched again.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import signal
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from blipinpaint.commit_log import CommitLog
from blipinpaint.errors import JobError
from blipinpaint.export_formats import READ_COLUMNS, Hashed, add_member, hf_table, licence_of, sample_key, wds_members
from blipinpaint.reader import read_part
from blipinpaint.storage import filesystem

# Where each format's files go below the export folder, and their suffix.
FOLDERS = {"hf": ("hf/data", ".parquet"), "webdataset": ("webdataset", ".tar")}
# The export's commit log: a row per exported sample.
LEDGER_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("split", pa.string()),
                           ("shard", pa.string()), ("key", pa.string()), ("licence", pa.string()),
                           ("models", pa.string()),  # the row's checkpoints, as JSON
                           ("files", pa.string())])  # the shard's files: JSON {path: {sha256, size}}


def plan(splits: dict[str, list[dict]], rows_per_shard: int) -> list[dict]:
    """Shards of at most `rows_per_shard` rows, per split: `splits` maps a split's name to its
    read tasks (`reader.row_reads`: parts in name order, ids sorted), which the shards take
    in that order. A shard: {split, name (`<split>-00001-of-00004`), reads, ids}."""
    shards = []
    for split, reads in splits.items():
        rows = [(r["path"], i) for r in reads for i in r["ids"]]
        count = math.ceil(len(rows) / rows_per_shard)
        for index in range(count):
            chunk = rows[index * rows_per_shard:(index + 1) * rows_per_shard]
            grouped: dict[str, list[str]] = {}
            for path, sample_id in chunk:
                grouped.setdefault(path, []).append(sample_id)
            shards.append({"split": split, "name": f"{split}-{index:05d}-of-{count:05d}",
                           "reads": [{"path": p, "ids": ids} for p, ids in grouped.items()],
                           "ids": [i for _, i in chunk]})
    return shards


def _kill(driver_pid: int) -> None:
    """Fault injection (tests): the job's driver ends as `kill -9` ends it, and so does this
    worker (Ray would end it with the driver's job, a moment later)."""
    try:
        os.kill(driver_pid, signal.SIGKILL)
    finally:
        os._exit(1)


class ShardWriter:
    """Writes one planned shard in each of `formats` and commits it to the export at `out`.

    `provenance` goes into every Parquet file's metadata; `owner` is the export run's token
    (a writer of a run taken over commits nothing); `kill`: (shard name, driver pid) of the
    tests' fault injection.
    """

    def __init__(self, out: str, formats: list[str], schema: pa.Schema, generate_fingerprint: str,
                 owner: str | None = None, kill: tuple[str, int] | None = None):
        self.out, self.formats, self.schema, self.owner, self.kill = out, formats, schema, owner, kill
        self.generate_fingerprint = generate_fingerprint
        self.fs, self.root = filesystem(out)

    def _staged(self, shard: dict, fmt: str) -> str:
        return posixpath.join(self.root, "_staging", "shards", shard["name"] + FOLDERS[fmt][1])

    def _final(self, shard: dict, fmt: str) -> str:
        folder, suffix = FOLDERS[fmt]
        return f"{folder}/{shard['name']}{suffix}"

    def __call__(self, shard: dict) -> dict:
        """Write, place and commit `shard`; returns its ledger marker's {name, rows}."""
        self.fs.create_dir(posixpath.join(self.root, "_staging", "shards"), recursive=True)
        streams = {fmt: self.fs.open_output_stream(self._staged(shard, fmt)) for fmt in self.formats}
        hashed = {fmt: Hashed(stream) for fmt, stream in streams.items()}
        parquet = pq.ParquetWriter(hashed["hf"], self.schema) if "hf" in hashed else None
        tar = tarfile.open(fileobj=hashed["webdataset"], mode="w|") if "webdataset" in hashed else None
        ledger, written = [], 0
        try:
            for read in shard["reads"]:
                rows = read_part(read, READ_COLUMNS)
                keys = [sample_key(i) for i in rows.column("id").to_pylist()]
                licences = [licence_of(a) for a in rows.column("annotations").to_pylist()]
                if parquet is not None:
                    parquet.write_table(hf_table(rows, keys, licences, self.generate_fingerprint, self.schema))
                for row, key, licence in zip(rows.to_pylist(), keys, licences):
                    if tar is not None:
                        for name, data in wds_members(row, key, shard["split"], licence, self.generate_fingerprint):
                            add_member(tar, name, data)
                    models = json.dumps({m[: -len("_model")]: row[m] for m in ("captioner_model", "inpainter_model",
                                                                                 "clip_model")}, sort_keys=True)
                    ledger.append({"id": row["id"], "source": row["source"], "split": shard["split"],
                                   "shard": shard["name"], "key": key, "licence": licence, "models": models})
                    written += 1
                    if self.kill is not None and self.kill[0] == shard["name"] and written * 2 >= len(shard["ids"]):
                        _kill(self.kill[1])
        finally:
            if tar is not None:
                tar.close()
            if parquet is not None:
                parquet.close()
            for stream in streams.values():
                stream.close()
        return self._commit(shard, ledger, {self._final(shard, fmt): h.record() for fmt, h in hashed.items()})

    def _commit(self, shard: dict, ledger: list[dict], files: dict[str, dict]) -> dict:
        """Move the staged files into place, then commit the shard: its marker is the proof."""
        log = CommitLog(self.out, LEDGER_SCHEMA, self.owner)
        log.check_owner()  # a run taken over moves nothing into place
        for fmt in self.formats:
            final = posixpath.join(self.root, self._final(shard, fmt))
            self.fs.create_dir(posixpath.dirname(final), recursive=True)
            self.fs.move(self._staged(shard, fmt), final)
        table = pa.Table.from_pylist(
            [{**row, "files": json.dumps(files, sort_keys=True), "error": ""} for row in ledger])
        marker = log.commit(table)
        return {"name": marker["name"], "rows": len(ledger)}


def committed_shards(out: str) -> list[dict]:
    """What each committed shard of the export at `out` says of itself, read from its ledger
    part (one small read per shard): {name, split, samples, files, licences, models}."""
    log = CommitLog(out, LEDGER_SCHEMA)
    fs, root = filesystem(out)
    shards = []
    for marker in log.markers():
        if not marker["samples"]:
            continue
        table = pq.read_table(posixpath.join(root, "samples", f"{marker['name']}.parquet"), filesystem=fs,
                              columns=["split", "shard", "licence", "models", "files"])
        names = set(table.column("shard").to_pylist())
        if len(names) != 1:
            raise JobError(f"{out}: ledger part {marker['name']} names shards {sorted(names)}, not one")
        shards.append({"name": names.pop(), "split": table.column("split")[0].as_py(), "samples": table.num_rows,
                       "files": json.loads(table.column("files")[0].as_py()),
                       "licences": Counter(v for v in table.column("licence").to_pylist() if v),
                       "models": Counter(table.column("models").to_pylist())})
    return sorted(shards, key=lambda s: s["name"])


def index(shards: list[dict], made_by: dict) -> dict:
    """The WebDataset shard index (`webdataset/index.json`): each split's shards (a brace
    pattern `wds.WebDataset` expands, and the list), each shard's samples, size and sha256."""
    tars = [s for s in shards if any(path.endswith(".tar") for path in s["files"])]
    splits = {}
    for split in dict.fromkeys(s["split"] for s in tars):
        names = [s["name"] for s in tars if s["split"] == split]
        count = len(names)
        splits[split] = {"samples": sum(s["samples"] for s in tars if s["split"] == split), "shards": names,
                         "pattern": f"{split}-{{00000..{count - 1:05d}}}-of-{count:05d}.tar"}
    listed = [{"url": posixpath.basename(path), "split": s["split"], "samples": s["samples"], **record}
              for s in tars for path, record in sorted(s["files"].items()) if path.endswith(".tar")]
    return {"format": "blipinpaint.webdataset-index/1", "made_by": made_by, "splits": splits, "shards": listed,
            "members": {"txt": "the caption", "json": "scores and provenance", "image.png": "the input, resized",
                        "mask.png": "white: hidden", "inpainted.png": "caption-guided",
                        "inpainted_baseline.png": "without text"}}
