"""The commit log read in a few requests: checkpoints that hold the content of many markers.

A commit writes one marker, `_commits/<part>.json`; a reader that opens each pays a request
per part (4.4 ms on the S3 endpoint on 127.0.0.1, 175 s for the 40,000 parts of 10^7
inputs). A compaction folds the loose markers and the checkpoints present into one new
checkpoint, `_checkpoints/ckpt-<seq>-<digest>.json.gz`, then deletes the markers it folded
in, then the checkpoints it merged. The log is what a reader finds: every checkpoint present
(a higher `seq` wins a part both hold), then the loose markers (a marker wins over any
checkpoint's copy of its part: it is the newer). So a compaction cut at any step reads the
same: before its checkpoint lands nothing changed; after, its checkpoint and whatever it has
not deleted yet hold the same markers. A reader lists `_commits/` before `_checkpoints/`
(a marker it misses was folded into a checkpoint written before it went), and reads again
when a file it listed is gone meanwhile (a compaction finished in between).

Trusted by content, never by name: `<digest>` is the BLAKE2b of the file's bytes, checked on
every first read, and a checkpoint that does not match is refused, named; its markers are
checked against the data files like loose ones (`recover`, `account`), so a stale or copied
checkpoint whose parts are not here counts nothing as done. The file says what made it:
its format, `seq`, the checkpoints it merged (by name, so by digest) and each marker whole.
How compaction interleaves with commits: RELIABILITY.md, "The commit log's checkpoints".
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
from collections.abc import Collection

from pyarrow import fs as pafs

from blipinpaint.errors import JobError

CHECKPOINTS = "_checkpoints"
FORMAT = "blipinpaint.commit-checkpoint/1"
COMPACT_EVERY = 500  # `stream.compact_every`'s default: docs/configuration.md says why
READ_TRIES = 8  # reads racing that many compactions in a row give up, named
NAME = re.compile(r"ckpt-(\d{8})-([0-9a-f]{32})\.json\.gz")
log = logging.getLogger(__name__)


def checkpoint_name(seq: int, data: bytes) -> str:
    return f"ckpt-{seq:08d}-{hashlib.blake2b(data, digest_size=16).hexdigest()}.json.gz"


class CompactedLog:
    """The read and the compaction of a commit log (`commit_log.CommitLog`, which has the
    filesystem `fs`, `_path`, `_put`, `_delete` and `out_dir`)."""

    _step = staticmethod(lambda step: None)  # between a compaction's steps (tests cut it short there)

    def _names(self, folder: str, pattern: re.Pattern | None = None) -> set[str]:
        """The files of a folder of the log (one listing per 1,000 names on S3)."""
        selector = pafs.FileSelector(self._path(folder), allow_not_found=True)
        files = [i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]
        if pattern is not None:
            return {name for name in files if pattern.fullmatch(name)}
        return {name[:-len(".json")] for name in files if name.endswith(".json") and not name.startswith(".")}

    def _checkpoint(self, name: str) -> list[dict]:
        """A checkpoint's markers: read and checked once, then kept (its name is its digest)."""
        cached = self._checkpoints.get(name)
        if cached is not None:
            return cached
        with self.fs.open_input_stream(self._path(CHECKPOINTS, name), compression=None) as f:  # not by the name
            data = f.read()
        seq = int(NAME.fullmatch(name).group(1))
        if checkpoint_name(seq, data) != name:
            raise JobError(f"{self.out_dir}: {CHECKPOINTS}/{name} does not hold what its name says (its bytes "
                           f"digest to {checkpoint_name(seq, data)}): it is not read. Move it out of {CHECKPOINTS}/ "
                           "and run again: the parts only it names are done again")
        content = json.loads(gzip.decompress(data))
        if content.get("format") != FORMAT:
            raise JobError(f"{self.out_dir}: {CHECKPOINTS}/{name} is of format {content.get('format')!r}, "
                           f"not {FORMAT!r}: written by another version")
        self._checkpoints[name] = content["markers"]
        return content["markers"]

    def _read_log(self, skip: Collection[str] = ()) -> tuple[dict[str, dict], set[str], set[str]]:
        """Part name -> its marker (but the parts named in `skip`), the loose markers' names and
        the checkpoints' names: the loose markers listed first (see the module's docstring)."""
        for _ in range(READ_TRIES):
            loose = self._names("_commits")
            checkpoints = self._names(CHECKPOINTS, NAME)
            try:
                entries = {m["name"]: m for name in sorted(checkpoints) for m in self._checkpoint(name)
                           if m["name"] not in skip}
                for name in sorted(loose - set(skip)):
                    with self.fs.open_input_stream(self._path("_commits", f"{name}.json")) as f:
                        entries[name] = json.loads(f.read())
            except FileNotFoundError:  # folded and deleted by a compaction since the listings
                continue
            self._checkpoints = {name: self._checkpoints[name] for name in checkpoints}  # the merged ones go
            return entries, loose, checkpoints
        raise JobError(f"{self.out_dir}: the commit log changed under {READ_TRIES} reads in a row "
                       "(compactions running back to back?); run the same command again")

    def markers(self, skip: Collection[str] = ()) -> list[dict]:
        """The commit markers in name order, but those of the parts named in `skip`: the latest
        checkpoints' plus the loose ones, a request per checkpoint not read before and per
        loose marker, and two listings."""
        entries, _, _ = self._read_log(skip)
        return [entries[name] for name in sorted(entries)]

    def compact(self, drop: Collection[str] = ()) -> dict | None:
        """Fold every loose marker and checkpoint into one checkpoint, less the parts named in
        `drop` (parts being removed: their data is gone already). Nothing is written when
        there is nothing to fold. Returns what it did."""
        entries, loose, checkpoints = self._read_log()
        if not drop and not loose and len(checkpoints) <= 1:
            return None
        self._step("read")
        kept = [entries[name] for name in sorted(entries) if name not in drop]
        seq = 1 + max((int(NAME.fullmatch(c).group(1)) for c in checkpoints), default=0)
        content = {"format": FORMAT, "seq": seq, "merged": sorted(checkpoints), "markers": kept}
        data = gzip.compress(json.dumps(content, sort_keys=True).encode(), mtime=0)
        name = checkpoint_name(seq, data)
        self.fs.create_dir(self._path(CHECKPOINTS), recursive=True)
        self._put(CHECKPOINTS, name, data)  # whole or absent, as a marker
        self._checkpoints[name] = kept
        self._step("checkpoint written")
        for part in sorted(loose):
            self._delete(self._path("_commits", f"{part}.json"))
        self._step("markers deleted")
        for old in sorted(checkpoints):
            self._delete(self._path(CHECKPOINTS, old))
        done = {"checkpoint": name, "parts": len(kept), "markers_folded": len(loose),
                "checkpoints_merged": len(checkpoints)}
        log.debug("%s: commit log compacted: %s", self.out_dir, done)  # one per run at least: not in the job output
        return done

    def _maybe_compact(self, every: int) -> None:
        """After a commit: compact when `every` loose markers or more are there. Concurrent
        writers may both compact; both checkpoints are read (see the module's docstring)."""
        if not every or len(self._names("_commits")) < every or not self.owns():
            return
        try:
            self.compact()
        except (OSError, JobError) as err:  # the part is committed: a compaction left is the next one's
            log.warning("%s: commit log not compacted this time: %s", self.out_dir, err)
