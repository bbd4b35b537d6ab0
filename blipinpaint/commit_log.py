"""Exactly-once Parquet output: staged files, a commit marker, then the move into place.

An output folder (local or s3://) holds `samples/` and `errors/` (committed parts only),
`_commits/<part>.json` (a part is committed when its marker exists), `_checkpoints/`
(compactions of many markers, `blipinpaint.checkpoints`), `_staging/` (files being
written), `_owner.json` (the run that writes here now) and `_released.json`. The marker is
written after the staged files and before they move, so `recover()` can finish or undo a
part cut at any point; a part's name is a hash of its ids, so a retried write replaces,
never duplicates. A new run takes the folder over, and a writer of an earlier run checks
the owner before its commit point and gives up (`Superseded`). What this assumes of the
store: docs/inputs-outputs.md, "Exactly once".
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import uuid
from collections.abc import Callable, Collection

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from blipinpaint.checkpoints import CHECKPOINTS, COMPACT_EVERY, CompactedLog
from blipinpaint.checkpoints import NAME as CHECKPOINT_NAME
from blipinpaint.commits import (
    DATA_DIRS,
    RERUN_CAUSES,
    Account,
    Resumed,
    Superseded,
    account_of,
    part_name,
    stage_failed_parts,
    stage_failure,
)
from blipinpaint.errors import JobError
from blipinpaint.layout import Folder
from blipinpaint.log_table import LogView
from blipinpaint.records import SAMPLE_SCHEMA, split_rows
from blipinpaint.storage import filesystem, is_remote, write_text

OWNER = "_owner.json"
RELEASED = "_released.json"
# Predicates on markers (`uncommit`'s) that have a form over the log's id table.
ARROW_FORMS: dict[Callable, Callable[[pa.Table], set[str]]] = {stage_failure: stage_failed_parts}
log = logging.getLogger(__name__)


class CommitLog(CompactedLog):
    """The parts of one output folder. With `owner` (a run's token) a commit first checks
    that this run still owns the folder. `compact_every`: a commit that finds that many loose
    markers or more compacts the log (`blipinpaint.checkpoints`); the owner's setting, kept in
    `_owner.json` by `take_over`, is what its writers follow; 0 compacts only at `finish`."""

    def __init__(self, out_dir: str, schema: pa.Schema = SAMPLE_SCHEMA, owner: str | None = None,
                 compact_every: int = COMPACT_EVERY):
        self.out_dir, self.schema, self.owner, self.compact_every = out_dir, schema, owner, compact_every
        self.fs, self.root = filesystem(out_dir)
        self.here = f"{self.fs.type_name}://{self.root.rstrip('/')}"  # what a checkpoint's `placed` flags hold for
        self._checkpoints: dict[str, tuple] = {}  # checkpoint name (its digest) -> what it holds
        self._loose: dict[str, dict] = {}  # loose marker's name -> the marker as last read
        self._owner_found: dict | None = None  # `_owner.json` as the last owner check read it

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path, compression=None) as f:  # bytes as given (not by the name)
            f.write(data)

    def _read_json(self, name: str) -> dict | None:
        try:  # one request: every commit reads the owner
            with self.fs.open_input_stream(self._path(name)) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def take_over(self, grace_s: float = 5.0) -> str:
        """Make a new run the folder's only writer; return its token.

        When the previous run did not finish (its driver died), its tasks in flight may be
        between their owner check and their commit point: wait `grace_s` for those commits
        to land before the caller recovers and lists what is committed.
        """
        previous, released = self._read_json(OWNER), self._read_json(RELEASED)
        token = uuid.uuid4().hex
        if not is_remote(self.out_dir):  # a bucket has no folders to make (two requests saved)
            self.fs.create_dir(self.root, recursive=True)
        self._replace(OWNER, {"token": token, "compact_every": self.compact_every})
        if previous is not None and previous["token"] != (released or {}).get("token"):
            log.info("%s: the previous run did not finish; waiting %.0f s for its last commits", self.out_dir, grace_s)
            self._wait(grace_s)
        self.owner = token
        return token

    _wait = staticmethod(time.sleep)  # (tests record the waits instead)
    _now = staticmethod(time.time)  # what the stores' file times are compared with (tests set the clock)

    def release(self) -> None:
        """Say that the owner's run finished: the next run need not wait for stragglers.
        A file of its own, so that a run taken over never touches the new owner's file."""
        self._replace(RELEASED, {"token": self.owner})

    def _replace(self, name: str, content: dict) -> None:
        # Every commit of every task reads the owner file: it must never be seen half written.
        self._put("", name, json.dumps(content).encode())

    def _put(self, folder: str, name: str, data: bytes) -> None:
        """Write a whole small file that readers see complete or not at all. An object store's
        PUT is that already; a local write truncates first, so on a disk the file is written
        beside (a dot-name `recover` cleans up) and renamed into place."""
        if is_remote(self.out_dir):
            self._write_bytes(self._path(folder, name), data)
            return
        tmp = self._path(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        self._write_bytes(tmp, data)
        self.fs.move(tmp, self._path(folder, name))

    def owns(self) -> bool:
        """Whether this run (`owner`) still owns the folder; without an owner, always."""
        if self.owner is None:
            return True
        current = self._owner_found = self._read_json(OWNER)
        return current is not None and current["token"] == self.owner

    def check_owner(self) -> None:
        if not self.owns():
            raise Superseded(f"{self.out_dir} is now written by another run; this run's writes stop here")

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
            "reruns": {},
        }
        for c in table.column_names:
            if c.startswith("reruns_"):
                stage, cause = c[len("reruns_"):].rsplit("_", 1)
                marker["reruns"].setdefault(stage, {})[RERUN_CAUSES[cause]] = int(pc.sum(table.column(c)).as_py() or 0)
        attempt = uuid.uuid4().hex[:12]
        # When it committed, by this worker's clock: the markers a compaction folded away keep it.
        marker["staged"], marker["committed_at"] = {}, round(self._now(), 3)
        for folder, part in zip(DATA_DIRS, (samples, errors)):
            if part.num_rows:
                staged = f"{name}.{attempt}.parquet"
                self.fs.create_dir(self._path("_staging", folder), recursive=True)
                pq.write_table(part, self._path("_staging", folder, staged), filesystem=self.fs)
                marker["staged"][folder] = staged
        try:
            self.check_owner()
        except Superseded:
            # Its staged files would outlive the new owner's `recover()` (done when it took over):
            # take them back (that recovery may have removed them already). A writer killed right
            # here leaves them to the next recovery.
            for folder, staged in marker["staged"].items():
                self._delete(self._path("_staging", folder, staged))
            raise
        self.fs.create_dir(self._path("_commits"), recursive=True)
        self._put("_commits", f"{name}.json", json.dumps(marker).encode())  # the commit point
        self._publish(marker)
        for folder in DATA_DIRS:  # this part committed before with rows in the other folder: not any more
            if folder not in marker["staged"]:
                self._delete(self._path(folder, f"{name}.parquet"))
        self._maybe_compact((self._owner_found or {}).get("compact_every", self.compact_every))
        return marker

    def _delete(self, path: str) -> None:
        """Delete a file that may not be there (one request on S3, as a check first would be)."""
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    def _publish(self, marker: dict) -> None:
        """Move a committed part's files into place. A file a recovery moved already is in place;
        one in neither place was removed by a recovery that did not see the marker (it landed
        after that recovery listed the markers): the part is lost, and said so."""
        for folder, staged in marker["staged"].items():
            source, target = self._path("_staging", folder, staged), self._path(folder, f"{marker['name']}.parquet")
            if self.fs.get_file_info(source).type == pafs.FileType.File:
                self.fs.create_dir(self._path(folder), recursive=True)
                self.fs.move(source, target)
            elif self.fs.get_file_info(target).type != pafs.FileType.File:
                lost = (f"{self.out_dir}: part {marker['name']} committed, but its staged {folder} file is gone (a "
                        "recovery removed it before the marker landed); the next recovery drops the part and its "
                        "rows are done again")
                raise (JobError if self.owns() else Superseded)(lost)

    def _listing(self, folder: str) -> dict[str, float]:
        """The files in a folder of the output, by name, with their ages in seconds (by the
        store's file times): one listing, not a request per file."""
        selector, now = pafs.FileSelector(self._path(folder), allow_not_found=True), self._now()
        return {i.base_name: now - i.mtime.timestamp() for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.File}

    def _staged(self) -> dict[str, dict[str, float]]:
        """`_staging/<folder>`'s files with their ages, per data folder: one listing for both."""
        selector, now = pafs.FileSelector(self._path("_staging"), allow_not_found=True, recursive=True), self._now()
        staged = {folder: {} for folder in DATA_DIRS}
        for i in self.fs.get_file_info(selector):
            folder = posixpath.basename(posixpath.dirname(i.path))
            if i.type == pafs.FileType.File and folder in staged and posixpath.dirname(posixpath.dirname(i.path)) \
                    == self._path("_staging").rstrip("/"):
                staged[folder][i.base_name] = now - i.mtime.timestamp()
        return staged

    def _files(self, folder: str) -> set[str]:
        return set(self._listing(folder))

    def recover(self, grace_s: float = 0.0) -> dict[str, int]:
        """Finish committed parts, undo uncommitted ones; return what was done.

        A marker whose data is gone both staged and published (an `uncommit` cut short, a
        recovery that removed a straggler's staged file before its marker landed, or files
        deleted by hand) is dropped: its ids are pending again, never silently lost. So is a
        part sharing an id with a part kept before it (parts with samples first): only a
        writer that outlived the owner check can cause that, and the ids of the dropped part
        that are nowhere else are redone. Files no marker names that are younger than
        `grace_s` (by the store's file times) are left to the writer that may still commit
        or take them back.
        """
        staged = self._staged()
        view = self._read_log()
        # The data of the parts a compaction found in place is not looked for again (a listing
        # of 80,000 files at 10^7 inputs): those of the parts committed since are.
        published = self._published_of([p for n, p in view.parts.items() if n not in view.placed], len(view.parts))
        # Ids in two parts are rare (a writer that outlived the owner check): only then is a
        # Python object made per id; otherwise each part is checked by its fields alone.
        whole = view.duplicates() > 0
        markers = view.markers() if whole else list(view.parts.values())
        with_samples = {m["name"] for m in markers if m["samples"]} if whole else set()
        kept, dropped, seen = [], [], set()
        for marker in sorted(markers, key=lambda m: (m["name"] not in with_samples, m["name"])):
            files = marker["staged"].items()
            ids = {*marker["samples"], *marker["errors"]} if whole else set()
            placed = marker["name"] in view.placed
            if ids & seen or not placed and any(name not in staged[f] and f"{marker['name']}.parquet"
                                                not in published[f] for f, name in files):
                dropped.append(marker)
                continue
            seen |= ids
            kept.append(marker)
            if placed:
                continue
            for folder, name in files:
                if name in staged[folder]:
                    self.fs.create_dir(self._path(folder), recursive=True)
                    self.fs.move(self._path("_staging", folder, name), self._path(folder, f"{marker['name']}.parquet"))
                    staged[folder].pop(name)
            for folder in DATA_DIRS:  # a re-commit cut short before the other folder's file went
                if folder not in marker["staged"] and f"{marker['name']}.parquet" in published[folder]:
                    self.fs.delete_file(self._path(folder, f"{marker['name']}.parquet"))
        self._remove(dropped, view)
        removed = self._remove_unnamed(kept, staged, grace_s)
        return {"committed_parts": len(kept), "orphans_removed": removed, "parts_dropped": len(dropped)}

    def _remove_unnamed(self, markers: list[dict], staged: dict[str, dict[str, float]], grace_s: float) -> int:
        """Delete the staged files (`staged`: folder -> name -> age) and temporary files that no
        marker of `markers` names, but those younger than `grace_s`; return how many went."""
        named = {(folder, name) for m in markers for folder, name in m["staged"].items()}
        unnamed = {self._path("_staging", f, name): age for f in DATA_DIRS for name, age in staged[f].items()
                   if (f, name) not in named}
        temporary = () if is_remote(self.out_dir) else ("_commits", CHECKPOINTS, "")  # `_put`'s, on a disk only
        unnamed |= {self._path(folder, name): age for folder in temporary for name, age in
                    self._listing(folder).items() if name.startswith(".") and name.endswith(".tmp")}
        removed = [path for path, age in unnamed.items() if age >= grace_s]
        for path in removed:
            self._delete(path)
        if len(removed) < len(unnamed):
            log.info("%s: %d staged files younger than %.0f s left to their writers", self.out_dir,
                     len(unnamed) - len(removed), grace_s)
        return len(removed)

    def _remove(self, markers: list[dict], view: LogView | None = None) -> None:
        """Delete parts: data first (in both folders: a re-commit may have been cut short before
        its other folder's file went), the record last (a cut-short removal is finished by
        `recover`): the marker, or, once the log has checkpoints, a checkpoint without them.
        Before any data goes, a part a checkpoint flags `placed` gets a loose marker again
        (`view`: the log as the caller read it), which wins over that flag: cut short after
        that, the next `recover` looks for its files, finds them gone and drops it."""
        view = self._read_log() if view is None else view
        flagged = {m["name"] for m in markers} & view.placed
        for marker in view.only(flagged).markers() if flagged else ():
            self._put("_commits", f"{marker['name']}.json", json.dumps(marker).encode())
        for marker in markers:
            paths = [self._path(folder, f"{marker['name']}.parquet") for folder in DATA_DIRS]
            paths += [self._path("_staging", folder, name) for folder, name in marker["staged"].items()]
            for path in paths:
                self._delete(path)
        if markers and self._names(CHECKPOINTS, CHECKPOINT_NAME):
            self.compact(drop={m["name"] for m in markers})
            return
        for marker in markers:
            self.fs.delete_file(self._path("_commits", f"{marker['name']}.json"))

    def _listed_ids_of(self, parts: set[str], account: Account) -> pa.Array:
        """The ids of the parts named that `account` counted (those listed)."""
        ids = self._read_log().only(parts).id_array()
        return ids.filter(pc.is_in(ids, value_set=account.listed_ids))

    def uncommit(self, matches: Callable[[dict], bool]) -> pa.Array:
        """Remove the committed parts whose marker `matches`; return their ids (pending again).
        A predicate with an Arrow form (`ARROW_FORMS`: `stage_failure`, which a resume with
        `retry_failed` asks for) is asked of the log's id table, not of a Python object per id."""
        view = self._read_log()
        if matches in ARROW_FORMS:
            names = ARROW_FORMS[matches](view.ids)
            parts = [view.parts[n] for n in sorted(names)]  # `_remove` reads a part's fields, not its ids
        else:
            parts = [m for m in view.markers() if matches(m)]
            names = {m["name"] for m in parts}
        self._remove(parts, view)
        return view.only(names).id_array() if names else pa.array([], pa.string())

    def committed_samples(self) -> pa.Table:
        """The committed samples (from the markers: no data is read), a row each: `part` (its
        part's name) and `id`, in the log's order (parts in name order), as Arrow columns."""
        view = self._read_log()
        rows = view.ids.filter(pc.is_null(view.ids.column("error_kind")))
        table = pa.table({"part": rows.column("part").cast(pa.string()), "id": rows.column("id")})
        return table.take(pc.sort_indices(table, [("part", "ascending")])) if table.num_rows else table

    def view(self) -> LogView:
        """The log as one read finds it (`LogView`: the parts' fields, their ids as Arrow)."""
        return self._read_log()

    def committed_id_array(self) -> pa.Array:
        """The committed ids (samples and errors) as one Arrow array: no Python object per id."""
        return self._read_log().id_array()

    def committed_ids(self) -> set[str]:
        """The committed ids as a Python set (for small logs: `committed_id_array` for large)."""
        return set(self.committed_id_array().to_pylist())

    def resume(self, retry_failed: bool = False, grace_s: float = 5.0) -> Resumed:
        """Start a run here: take the folder over (a killed run's stragglers stop committing),
        finish or undo what it left, and with `retry_failed` make the parts of batches a
        model stage failed on pending again (a preempted machine, not their images). The log
        is read again after the recovery (a straggler's marker may have landed since: its ids
        count as done, and `account` finds its data missing); the checkpoints read then are
        kept, and so are the loose markers read (a part's ids are those its name digests), so
        that costs two listings and the markers new since."""
        owner = self.take_over(grace_s)  # before recovering
        recovered = self.recover(grace_s)
        retried = self.uncommit(stage_failure) if retry_failed else pa.array([], pa.string())
        return Resumed(owner, recovered, retried, self._read_log(ids_only=True).id_array())

    def account(self, listed: pa.Array | pa.ChunkedArray | Collection[str]) -> Account:
        """Where each of the `listed` ids (an Arrow array, or a small collection) stands: a
        sample, an error (and why), missing or duplicated. The ids of a part whose files are not
        all in place count as missing (its marker names data a recovery removed, or that was
        deleted): the next `recover` drops it. Counted with Arrow compute, the ids kept as
        Arrow arrays: no Python object per id."""
        return account_of(self._read_log(), self.published(), listed)

    def finish(self, stats: dict, account: Account, what: str, success: str = "", grace_s: float = 5.0) -> None:
        """End the run: its `stats.json`, `_SUCCESS` (holding `success`) when every listed id is
        accounted for and the files `account` found are still in place (one listing per
        folder), the folder released; a `JobError` naming the `what` (e.g. "inputs") missing
        or duplicated. Staged files of an earlier run that its writer never committed nor
        took back (it died after the recovery left them, younger than the grace) go first."""
        staged = self._staged()  # listed first, as `recover` does
        if any(staged.values()):  # usually nothing: the markers are read only when there is
            self._remove_unnamed(self.markers(), staged, grace_s)
        published = self.published()
        # The next reader reads one checkpoint, whose `placed` flags are this listing's: a part
        # whose data went since an earlier compaction flagged it loses its flag, so the next
        # `recover` looks for its files and drops it (nothing written when nothing changed).
        self.compact(published=published)
        if account.complete:
            gone_parts = {part for path, part in account.files.items()
                          if posixpath.basename(path) not in published[posixpath.dirname(path)]}
            if gone_parts:
                account = account.with_missing(self._listed_ids_of(gone_parts, account))
        write_text(Folder(self.out_dir).stats, json.dumps(stats, indent=2))
        if account.complete:
            write_text(Folder(self.out_dir).success, success)
        self.release()
        account.check(self.out_dir, what)
