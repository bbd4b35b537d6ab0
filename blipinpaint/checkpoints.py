"""The commit log read in a few requests: checkpoints that hold the content of many markers.

A commit writes one marker, `_commits/<part>.json`; a reader that opens each pays a request
per part (4.4 ms on the S3 endpoint on 127.0.0.1, 175 s for the 40,000 parts of 10^7
inputs). Checkpoints, `_checkpoints/ckpt-<seq>-<digest>.parquet` (columns:
`blipinpaint.log_table`), hold them instead. The log is what a reader finds: every
checkpoint present but those another present one merged (a higher `seq` wins a part two
hold; of one `seq`, two writers' folds at once, the copy committed last), then the loose
markers (a marker wins over any checkpoint's copy of its part: it is the newer). A reader
lists `_commits/` before `_checkpoints/` (a marker it misses was folded into a checkpoint
written before it went), and reads again when a file it listed is gone meanwhile (a
compaction finished in between).

Two compactions, each a new file first, then deletions, so one cut at any step reads the
same (before its file lands nothing changed; after, its file holds what the files it has
not deleted yet hold):
- a writer's (`fold`, every `stream.compact_every` commits) costs the parts committed since,
  not the log: the loose markers become a checkpoint of their parts only (newest `seq`),
  flagged `placed` by a HEAD per data file, then the markers go. Then, while `MERGE_AT` (4)
  checkpoints of one size tier (about 4^t folds' parts) are among the newest, they are
  merged into one (the newest ones only, never splitting a `seq` it knows of, taking the
  newest `seq` among them: a merge never makes an older copy of a part the one read, as a
  tie of `seq`s goes to the copy committed last), then deleted. A part is rewritten once per tier
  it climbs: a run of F folds writes each part about
  1 + log4(F) times at most (4.9 at the 781 folds of 10^8 inputs), and at most 3 checkpoints a tier
  are present (a reader reads O(log F) files: 3 x 5 = 15 at most at 10^8).
- a run's end (`finish`) and a removal (`compact(drop)`) fold everything, checkpoints and
  markers, into one, listing the data folders for the flags: O(N) once a run, and what a
  removal needs (a checkpoint without the parts removed, merging every older one).
A merge also merges the present checkpoints that its sources had merged (a removal's
deletions cut short): were those left, its sources gone, they would read again, with the
parts the removal dropped.

Trusted by content, never by name: `<digest>` is the BLAKE2b of the file's bytes, checked on
every first read (one GET of the whole file, then parsed from memory), and a checkpoint that
does not match is refused, named; its parts are checked against the data files like loose
ones (`recover`, `account`), so a stale or copied checkpoint whose parts are not here counts
nothing as done. The file says what made it: its format, `seq`, the checkpoints it merged
(by name, so by digest), its part count, whether its ids are all distinct (within the file),
and each marker whole. What to merge is picked from the part counts in the checkpoints'
footers (a ranged read, not checked: a merge reads and checks its sources whole).
Every compaction flags `placed` the parts whose files it found in place (in the folder it
names): `recover` looks for the files of the other parts only. An id in two parts is found
by the readers that need it (`recover`, `account`) with Arrow, when each file says its own
ids are distinct: the id columns (each checkpoint's, the loose markers') hashed from the
smallest up and the larger ones looked up in each (`log_table.disjoint`: the largest is
never hashed); else every id counted.
Checkpoints of the first format (`ckpt-<seq>-<digest>.json.gz`, gzipped JSON) and of the
second (Parquet, no flags) are read the same way; the next compaction of the whole log
rewrites them (a writer's leaves a JSON one to it).
A compaction reads the owner once its checkpoint has landed and takes the checkpoint back when
another run owns the folder now (that run may have removed parts it holds, unseen).
How compaction interleaves with commits: RELIABILITY.md, "The commit log's checkpoints".
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import re
import secrets
from collections.abc import Collection

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from blipinpaint.commits import DATA_DIRS, Superseded
from blipinpaint.errors import JobError
from blipinpaint.log_table import FORMAT, READS, LogView, decode, encode, fields, log_view, marker_rows

CHECKPOINTS = "_checkpoints"
JSON_FORMAT = "blipinpaint.commit-checkpoint/1"  # gzipped JSON: read, and compacted anew as Parquet
COMPACT_EVERY = 500  # `stream.compact_every`'s default: docs/configuration.md says why
LIST_PAGE = 1000  # names per listing request (S3's page)
READ_TRIES = 8  # reads racing that many compactions in a row give up, named
UNMERGED = 1 << 62  # the part count given a checkpoint a writer's compaction leaves to the run's end
MERGE_AT = 4  # checkpoints of one size tier that a writer's compaction merges into one (the docstring says why)
NAME = re.compile(r"ckpt-(\d{8})-([0-9a-f]{32})\.(parquet|json\.gz)")
log = logging.getLogger(__name__)


def checkpoint_name(seq: int, data: bytes, suffix: str = "parquet") -> str:
    return f"ckpt-{seq:08d}-{hashlib.blake2b(data, digest_size=16).hexdigest()}.{suffix}"


def _json_checkpoint(data: bytes) -> tuple[dict, list[dict], pa.Table]:
    """A checkpoint of the first format as the Parquet one reads."""
    content = json.loads(gzip.decompress(data))
    if content.get("format") != JSON_FORMAT:
        raise ValueError(f"format {content.get('format')!r}")
    markers = content["markers"]
    ids = [i for m in markers for i in (*m["samples"], *m["errors"])]
    info = {"format": JSON_FORMAT, "seq": content["seq"], "merged": content["merged"],
            "unique": len(set(ids)) == len(ids), "placed": set()}
    return info, [fields(m) for m in markers], marker_rows(markers)


class CompactedLog:
    """The read and the compaction of a commit log (`commit_log.CommitLog`, which has the
    filesystem `fs`, `_path`, `_put`, `_delete`, `_files`, `owns`, `out_dir` and `here`: the folder as
    its filesystem names it, which a checkpoint's `placed` flags hold for)."""

    _step = staticmethod(lambda step: None)  # between a compaction's steps (tests cut it short there)

    def _names(self, folder: str, pattern: re.Pattern | None = None) -> set[str]:
        """The files of a folder of the log (one listing per 1,000 names on S3)."""
        selector = pafs.FileSelector(self._path(folder), allow_not_found=True)
        files = [i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]
        if pattern is not None:
            return {name for name in files if pattern.fullmatch(name)}
        return {name[:-len(".json")] for name in files if name.endswith(".json") and not name.startswith(".")}

    @property
    def _counts(self) -> dict[str, int]:
        """How many parts each checkpoint seen holds, by name (so by digest)."""
        return self.__dict__.setdefault("_counts_seen", {})

    def _part_counts(self) -> dict[str, int]:
        """The checkpoints present and how many parts each holds: one listing, then the footer
        of each Parquet one not seen before (a HEAD and a ranged GET: the count in its metadata, not
        checked against the digest; it only picks what to merge, and a merge reads whole).
        A checkpoint of the first format counts as too large to merge (the run's end does)."""
        selector = pafs.FileSelector(self._path(CHECKPOINTS), allow_not_found=True)
        counts = {}
        for i in self.fs.get_file_info(selector):
            if i.type != pafs.FileType.File or not NAME.fullmatch(i.base_name):
                continue
            if i.base_name not in self._counts:
                try:
                    with self.fs.open_input_file(i.path) as f:  # a HEAD and the footer
                        meta = pq.read_schema(f).metadata or {}
                    found = json.loads(meta.get(b"blipinpaint", b"{}")).get("parts")
                except FileNotFoundError:  # merged by another writer since the listing
                    continue
                except (OSError, ValueError, pa.ArrowException):  # not Parquet (the first format), or unread
                    found = None
                if not isinstance(found, int):
                    counts[i.base_name] = UNMERGED  # not kept: read again next time
                    continue
                self._counts[i.base_name] = found
            counts[i.base_name] = self._counts[i.base_name]
        return counts

    def _checkpoint(self, name: str) -> tuple[dict, list[dict], pa.Table]:
        """A checkpoint's metadata, part fields and id rows: read and checked once, then kept
        (its name is its digest)."""
        cached = self._checkpoints.get(name)
        if cached is not None:
            return cached
        with self.fs.open_input_stream(self._path(CHECKPOINTS, name), compression=None) as f:  # not by the name
            data = f.read()
        seq, _, suffix = NAME.fullmatch(name).groups()
        if checkpoint_name(int(seq), data, suffix) != name:
            raise JobError(f"{self.out_dir}: {CHECKPOINTS}/{name} does not hold what its name says (its bytes "
                           f"digest to {checkpoint_name(int(seq), data, suffix)}): it is not read. Move it out of "
                           f"{CHECKPOINTS}/ and run again: the parts only it names are done again")
        try:
            content = _json_checkpoint(data) if suffix == "json.gz" else decode(data)
        except (ValueError, KeyError, OSError, pa.ArrowException) as err:
            raise JobError(f"{self.out_dir}: {CHECKPOINTS}/{name} is not a checkpoint this version reads "
                           f"({err}): written by another version") from None
        if content[0]["seq"] != int(seq):  # readers order and tie checkpoints by both
            raise JobError(f"{self.out_dir}: {CHECKPOINTS}/{name} says it is seq {content[0]['seq']}, its name "
                           f"{int(seq)}: it is not read. Move it out of {CHECKPOINTS}/ and run again: the parts "
                           "only it names are done again")
        if content[0]["format"] not in (*READS, JSON_FORMAT):
            raise JobError(f"{self.out_dir}: {CHECKPOINTS}/{name} is of format {content[0]['format']!r}, "
                           f"not {FORMAT!r}: written by another version")
        self._checkpoints[name] = content
        return content

    def _read_log(self, skip: Collection[str] = (), ids_only: bool = False) -> LogView:
        """The log but the parts named in `skip`: the loose markers listed first (see the
        module's docstring). With `ids_only`, a loose marker this reader read before is not
        read again: its ids are those its name is the digest of (its other fields, and
        which of its ids are errors, may have changed since)."""
        for _ in range(READ_TRIES):
            loose = self._names("_commits")
            checkpoints = self._names(CHECKPOINTS, NAME)
            try:
                sources = [self._checkpoint(name) for name in sorted(checkpoints)]  # by seq
                markers = []
                for name in sorted(loose - set(skip)):
                    if ids_only and name in self._loose:
                        markers.append(self._loose[name])
                        continue
                    with self.fs.open_input_stream(self._path("_commits", f"{name}.json")) as f:
                        markers.append(json.loads(f.read()))
                    self._loose[name] = markers[-1]
            except FileNotFoundError:  # folded and deleted by a compaction since the listings
                continue
            self._checkpoints = {name: self._checkpoints[name] for name in checkpoints}  # the merged ones go
            self._loose = {name: m for name, m in self._loose.items() if name in loose}
            return log_view(dict(zip(sorted(checkpoints), sources)), markers, set(skip), loose, self.here)
        raise JobError(f"{self.out_dir}: the commit log changed under {READ_TRIES} reads in a row "
                       "(compactions running back to back?); run the same command again")

    def markers(self, skip: Collection[str] = ()) -> list[dict]:
        """The commit markers in name order, but those of the parts named in `skip`: the latest
        checkpoints' plus the loose ones, a request per checkpoint not read before and per
        loose marker, and two listings. A Python object per id: `committed_id_array` and
        `LogView` are the readers for large logs."""
        return self._read_log(skip).markers()

    def published(self) -> dict[str, set[str]]:
        """The data folders' files, by folder: one listing each (a page per 1,000 names on S3)."""
        return {folder: self._files(folder) for folder in DATA_DIRS}

    def _published_of(self, parts: list[dict], total: int) -> dict[str, set[str]]:
        """Which of the data files of `parts` are published, by folder: a HEAD per file when
        that is fewer requests than listing the folders of `total` parts, else the listings."""
        if len(parts) >= max(1, -(-total // LIST_PAGE)):  # 2 HEADs a part against 2 folders' pages
            return self.published()
        return self._heads(parts)

    def _heads(self, parts: list[dict]) -> dict[str, set[str]]:
        """Which of the data files of `parts` are published, by folder: a HEAD per file."""
        paths = [(folder, f"{p['name']}.parquet") for p in parts for folder in DATA_DIRS]
        found = self.fs.get_file_info([self._path(folder, name) for folder, name in paths])
        published = {folder: set() for folder in DATA_DIRS}
        for (folder, name), info in zip(paths, found):
            if info.type == pafs.FileType.File:
                published[folder].add(name)
        return published

    def compact(self, drop: Collection[str] = (), published: dict[str, set[str]] | None = None) -> dict | None:
        """Fold every loose marker and checkpoint into one checkpoint, less the parts named in
        `drop` (parts being removed: their data is gone already), flagging `placed` the parts
        whose data files the listing of the data folders (`published`, listed here when not
        given) finds in place. Nothing is written when there is nothing to fold and no flag
        changes. Returns what it did."""
        view = self._read_log()
        checkpoints = view.checkpoints
        kept = view.only(set(view.parts) - set(drop))
        published = self.published() if published is None else published
        placed = {name for name, part in kept.parts.items() if in_place(name, part, published)}
        if not drop and not view.loose and len(checkpoints) <= 1 and placed == view.placed \
                and all(c.endswith(".parquet") for c in checkpoints):
            return None
        self._step("read")
        seq = 1 + max((int(NAME.fullmatch(c).group(1)) for c in checkpoints), default=0)
        info = {"format": FORMAT, "seq": seq, "merged": sorted(checkpoints), "unique": kept.duplicates() == 0,
                "folder": self.here}
        parts = [kept.parts[name] for name in sorted(kept.parts)]
        name, size = self._write(info, parts, kept.ids, placed)
        self._checkpoints[name] = ({**info, "parts": len(parts), "placed": placed}, parts, kept.ids)
        self._step("checkpoint written")
        for part in sorted(view.loose):
            self._delete(self._path("_commits", f"{part}.json"))
        self._step("markers deleted")
        for old in sorted(checkpoints):
            self._delete(self._path(CHECKPOINTS, old))
        done = {"checkpoint": name, "parts": len(parts), "placed": len(placed), "markers_folded": len(view.loose),
                "checkpoints_merged": len(checkpoints), "bytes": size}
        log.debug("%s: commit log compacted: %s", self.out_dir, done)  # one per run at least: not in the job output
        return done

    def _write(self, info: dict, parts: list[dict], ids: pa.Table, placed: set[str]) -> tuple[str, int]:
        """Write a checkpoint whole (or not at all, as a marker); its name and size. Then the
        owner is read: a checkpoint written once another run took the folder over is taken
        back (`Superseded`), as that run may have removed parts it holds (their data, then a
        checkpoint without them) after this one looked, and not seen it to merge."""
        # A nonce of this write: two writers folding the same markers at once would write the
        # same bytes under one name, and the one taking its checkpoint back below would delete
        # the other's, its parts then in no file of the log.
        data = encode({**info, "nonce": secrets.token_hex(8)}, parts, ids, placed)
        name = checkpoint_name(info["seq"], data)
        self.fs.create_dir(self._path(CHECKPOINTS), recursive=True)
        self._put(CHECKPOINTS, name, data)
        try:
            owned = self.owns()
        except Exception:  # the owner unread: the checkpoint is not left as if it were still owned
            self._delete(self._path(CHECKPOINTS, name))
            raise
        if not owned:
            self._delete(self._path(CHECKPOINTS, name))
            raise Superseded(f"{self.out_dir} is now written by another run: its commit log is not compacted "
                             f"by this one ({CHECKPOINTS}/{name} taken back)")
        return name, len(data)

    def fold(self, loose: Collection[str] | None = None) -> dict | None:
        """A writer's compaction: the loose markers (`loose`: their names as listed, listed here
        when not given) into a new checkpoint of their parts only, flagging `placed` those whose
        data files a HEAD each finds in place; then the newest checkpoints merged while
        `MERGE_AT` of one size tier are there (`_merge_tiers`). No older checkpoint is read
        unless it is merged. Returns what it did (None: nothing loose)."""
        counts = self._part_counts()
        markers = []
        for name in sorted(self._names("_commits") if loose is None else loose):
            try:
                with self.fs.open_input_stream(self._path("_commits", f"{name}.json")) as f:
                    markers.append(json.loads(f.read()))
            except FileNotFoundError:  # folded by another compaction since the listing (or removed)
                continue
        if not markers:
            return None
        self._step("read")
        parts, ids = [fields(m) for m in markers], marker_rows(markers)
        published = self._heads(parts)
        placed = {p["name"] for p in parts if in_place(p["name"], p, published)}
        column = ids.column("id")
        info = {"format": FORMAT, "seq": 1 + max(map(_seq, counts), default=0), "merged": [], "folder": self.here,
                "unique": len(pc.unique(column)) == len(column)}
        name, size = self._write(info, parts, ids, placed)
        self._step("checkpoint written")
        for m in markers:
            self._delete(self._path("_commits", f"{m['name']}.json"))
        self._step("markers deleted")
        self._counts[name] = len(parts)
        merges = self._merge_tiers({**counts, name: len(parts)}, len(parts))
        done = {"checkpoint": name, "parts": len(parts), "placed": len(placed), "markers_folded": len(markers),
                "bytes": size, "merges": merges}
        log.debug("%s: commit log folded: %s", self.out_dir, done)
        return done

    def _merge_tiers(self, counts: dict[str, int], unit: int) -> list[dict]:
        """Merge the newest checkpoints (`counts`: name -> parts) while `MERGE_AT` or more of one
        size tier are among the newest of that tier or below (tier t: about `MERGE_AT`^t times
        `unit`, the parts of a fold). Always the newest ones (a suffix in `seq` order, never
        splitting a `seq`), so that a merge never makes an older copy of a part the one read (`_merge`)."""
        merges = []
        while len(counts) >= MERGE_AT:
            names = sorted(counts)  # by seq
            tiers = [max(0, round(math.log(max(counts[n], 1) / max(unit, 1), MERGE_AT))) for n in names]
            suffix = None
            for tier in sorted(set(tiers)):
                start = len(names)
                while start and tiers[start - 1] <= tier:
                    start -= 1
                while 0 < start < len(names) and _seq(names[start - 1]) == _seq(names[start]):
                    start -= 1
                if sum(t == tier for t in tiers[start:]) >= MERGE_AT:
                    suffix = names[start:]
                    break
            done = suffix and self._merge(suffix, set(counts))
            if not done:
                return merges
            for old in done.pop("gone"):
                counts.pop(old, None)
            counts[done["checkpoint"]] = done["parts"]
            merges.append(done)
        return merges

    def _merge(self, suffix: list[str], present: set[str]) -> dict | None:
        """The checkpoints `suffix` (the newest) into one of the newest `seq` among them: it reads
        as they did (`log_table.log_view`), as the newest again. It merges, so readers skip, also the present
        checkpoints that those merged (a compaction's deletions cut short): a removal's
        checkpoint hides the parts it dropped from the older files until they go."""
        try:
            sources = {name: self._checkpoint(name) for name in suffix}
        except FileNotFoundError:  # merged by another writer meanwhile: the next fold looks again
            return None
        view = log_view(sources, [], set(), set(), self.here)
        merged = sorted(set(suffix) | ({n for info, _, _ in sources.values() for n in info["merged"]} & present))
        info = {"format": FORMAT, "seq": max(map(_seq, suffix)), "merged": merged, "folder": self.here,
                "unique": view.duplicates() == 0}
        name, size = self._write(info, [view.parts[n] for n in sorted(view.parts)], view.ids, view.placed)
        self._counts[name] = len(view.parts)
        for old in suffix:
            self._checkpoints.pop(old, None)  # a writer does not read them again
        self._step("merged")
        for old in merged:
            self._delete(self._path(CHECKPOINTS, old))
        self._step("merged deleted")
        return {"checkpoint": name, "parts": len(view.parts), "checkpoints_merged": len(merged), "bytes": size,
                "gone": merged}

    def _maybe_compact(self, every: int) -> None:
        """After a commit: fold when `every` loose markers or more are there. Concurrent
        writers may both fold; both checkpoints are read (see the module's docstring)."""
        if not every:
            return
        loose = self._names("_commits")
        if len(loose) < every or not self.owns():
            return
        try:
            self.fold(loose)
        except (OSError, JobError) as err:  # the part is committed: a compaction left is the next one's
            log.warning("%s: commit log not compacted this time: %s", self.out_dir, err)


def _seq(name: str) -> int:
    return int(NAME.fullmatch(name).group(1))


def in_place(name: str, part: dict, published: dict[str, set[str]]) -> bool:
    """Whether a part's data files are published in the folders it has rows in, and in no other
    (a re-commit that moved its rows between folders and was cut short leaves one there)."""
    return all((f"{name}.parquet" in published[folder]) == (folder in part["staged"]) for folder in DATA_DIRS)
