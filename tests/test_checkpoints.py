"""The commit log's checkpoints (`blipinpaint.checkpoints`): a compacted log reads in a few
requests and reads exactly as the markers did, whatever step a compaction was cut at."""

from __future__ import annotations

import gzip
import json
import posixpath
import uuid

import pyarrow.parquet as pq
import pytest
from helpers import sample_rows as _rows
from pyarrow import fs as pafs

from blipinpaint import checkpoints
from blipinpaint.checkpoints import CHECKPOINTS, JSON_FORMAT, CompactedLog, checkpoint_name
from blipinpaint.commit_log import CommitLog
from blipinpaint.commits import stage_failure
from blipinpaint.errors import JobError
from blipinpaint.log_table import LogView
from blipinpaint.storage import filesystem


def _files(uri: str, folder: str) -> list[str]:
    fs, root = filesystem(uri)
    selector = pafs.FileSelector(posixpath.join(root, folder), allow_not_found=True)
    return sorted(i.base_name for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)


def _read(uri: str) -> tuple[list[dict], set[str], dict]:
    """What a fresh reader learns: the markers, the committed ids, where ids stand."""
    log = CommitLog(uri)
    account = log.account([f"img{i:04d}" for i in range(400)])
    return log.markers(), log.committed_ids(), {"ok": account.ok, "errors": dict(account.errors_by_reason),
                                                "missing": len(account.missing), "duplicates": account.duplicates}


@pytest.fixture(params=["disk", "bucket"])
def uri(request, tmp_path) -> str:
    if request.param == "disk":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3")(f"ckpt-{uuid.uuid4().hex[:12]}") + "/out"


def _commit_parts(log: CommitLog, start: int, n: int) -> None:
    """`n` parts of one row each; every seventh an error row."""
    for i in range(start, start + n):
        log.commit(_rows([f"img{i:04d}"], ["not an image: x" if i % 7 == 0 else ""]))


def test_a_compacted_log_reads_in_a_few_requests_and_the_same(s3):
    """150 parts committed through the writer, read by a new run: one request per marker
    before compaction, a handful after (counted at the S3 endpoint), and the same answer."""
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    uri = s3(name) + "/out"
    log = CommitLog(uri, compact_every=0)  # no compaction while committing: the log of markers
    log.take_over(grace_s=0)
    _commit_parts(log, 0, 150)
    log.commit(_rows(["img0003"], ["stage failed: x"]))  # a part committed again (a retried task): replaced

    before = s3.requests(name)
    markers, ids, where = _read(uri)
    uncompacted = s3.requests(name) - before
    assert len(markers) == 150 and uncompacted > 150 and len(ids) == 150 and where["errors"]["stage failed"] == 1

    assert CommitLog(uri).compact()["markers_folded"] == 150
    assert _files(uri, "_commits") == [] and len(_files(uri, CHECKPOINTS)) == 1
    before = s3.requests(name)
    assert CommitLog(uri).committed_ids() == ids
    assert s3.requests(name) - before <= 4  # two listings and the checkpoint
    assert _read(uri) == (markers, ids, where)

    # A resumed run: the take-over (6: the owner file read, the released one looked for, the
    # owner written in 3), the recovery (5: 3 listings and the checkpoint's HEAD and GET; the
    # data of the parts the compaction found in place is not looked for) and what is
    # committed (2 listings: the checkpoint and the markers read are kept): 13 requests.
    before = s3.requests(name)
    resumed = CommitLog(uri).resume(grace_s=0)
    assert s3.requests(name) - before <= 13 and resumed.done == ids
    # Parts committed since: a HEAD and a GET a marker, and their data looked for (here the
    # listings of `samples/` and `errors/`: fewer requests than 2 HEADs a part).
    _commit_parts(CommitLog(uri, owner=resumed.owner, compact_every=0), 150, 2)
    before = s3.requests(name)
    resumed = CommitLog(uri).resume(grace_s=0)
    assert s3.requests(name) - before <= 13 + 2 + 2 * 2 and resumed.done == ids | {"img0150", "img0151"}


@pytest.mark.parametrize("cut", ["read", "checkpoint written", "markers deleted"])
def test_a_compaction_cut_at_any_step_leaves_a_log_that_reads_the_same(uri, cut, monkeypatch):
    log = CommitLog(uri, compact_every=0)
    _commit_parts(log, 0, 12)
    log.compact()  # an earlier checkpoint, for the next one to merge
    _commit_parts(log, 12, 8)
    log.commit(_rows(["img0001"], ["not an image: x"]))  # a part of the checkpoint committed again, loose
    expected = _read(uri)
    assert expected[2]["errors"] == {"not an image": 4}

    def die(step):
        if step == cut:
            raise KeyboardInterrupt(f"killed at {step!r}")  # what a SIGKILL leaves: nothing after this step

    monkeypatch.setattr(CompactedLog, "_step", staticmethod(die))
    with pytest.raises(KeyboardInterrupt):
        CommitLog(uri).compact()
    assert _read(uri) == expected
    monkeypatch.undo()
    done = CommitLog(uri).compact()
    assert done["parts"] == 20 and _read(uri) == expected
    assert _files(uri, "_commits") == [] and _files(uri, CHECKPOINTS) == [done["checkpoint"]]


def test_writers_compact_every_n_commits_and_the_run_at_its_end(uri):
    log = CommitLog(uri, compact_every=5)
    log.take_over(grace_s=0)  # the owner's setting, which every writer of the run follows
    writer = CommitLog(uri, owner=log.owner)
    _commit_parts(writer, 0, 13)
    # Two folds (at the 5th and the 10th commit), each a checkpoint of its own 5 parts.
    assert len(_files(uri, "_commits")) == 3 and len(_files(uri, CHECKPOINTS)) == 2
    assert CommitLog(uri).committed_ids() == {f"img{i:04d}" for i in range(13)}
    seen = {m["name"] for m in CommitLog(uri).markers()}
    progress = CommitLog(uri)  # a reader that keeps looking, as the progress line does
    assert progress.markers(skip=seen) == []
    _commit_parts(writer, 13, 4)  # one compaction more
    assert sorted(i for m in progress.markers(skip=seen) for i in m["samples"] + m["errors"]) == [
        f"img{i:04d}" for i in range(13, 17)]
    account = log.account([f"img{i:04d}" for i in range(17)])
    log.finish({}, account, "inputs")
    assert _files(uri, "_commits") == [] and len(_files(uri, CHECKPOINTS)) == 1 and "_SUCCESS" in _files(uri, "")
    files = _files(uri, CHECKPOINTS)  # the run's end merged the three folds
    log.finish({}, account, "inputs")  # nothing loose: nothing rewritten
    assert _files(uri, CHECKPOINTS) == files


def test_parts_in_a_checkpoint_are_redone_and_removed_like_loose_ones(uri, monkeypatch):
    """`retry_failed` removes a `stage failed` part a checkpoint holds; the part done again is
    read as its new commit; a removal cut short after its checkpoint is finished by `recover`."""
    log = CommitLog(uri, compact_every=0)
    log.commit(_rows(["a", "b"], ["", ""]))
    log.commit(_rows(["c"], ["stage failed: x"]))
    log.commit(_rows(["d"], ["stage failed: x"]))
    log.compact()
    resumed = CommitLog(uri).resume(retry_failed=True, grace_s=0)
    assert sorted(resumed.retried) == ["c", "d"] and resumed.done == {"a", "b"}
    assert _files(uri, "errors") == [] and _files(uri, "_commits") == []
    log.commit(_rows(["c"], [""]))  # done again, now a sample
    log.compact()
    assert CommitLog(uri).account(["a", "b", "c", "d"]).missing == ["d"]

    log.commit(_rows(["d"], ["stage failed: x"]))
    log.compact()

    def die(step):
        if step == "checkpoint written":
            raise KeyboardInterrupt(step)

    monkeypatch.setattr(CompactedLog, "_step", staticmethod(die))
    with pytest.raises(KeyboardInterrupt):
        CommitLog(uri).uncommit(stage_failure)  # its data went, its checkpoint landed; the old one is left
    monkeypatch.undo()
    assert CommitLog(uri).recover()["parts_dropped"] == 1  # the old checkpoint's copy: its data is gone
    assert CommitLog(uri).committed_ids() == {"a", "b", "c"} and len(_files(uri, CHECKPOINTS)) == 1


def test_a_checkpoint_is_trusted_by_its_content_not_its_name(uri, tmp_path):
    log = CommitLog(uri, compact_every=0)
    log.commit(_rows(["a"], [""]))
    (name,) = [log.compact()["checkpoint"]]
    fs, root = filesystem(uri)
    # Copied from another folder under a name of its own: not read, and named.
    other = CommitLog(str(tmp_path / "other"), compact_every=0)
    other.commit(_rows(["x"], [""]))
    foreign = other.compact()["checkpoint"]
    renamed = name[:-len("0.json.gz")] + ("1" if name[-len("0.json.gz")] == "0" else "0") + ".json.gz"
    with open(tmp_path / "other" / CHECKPOINTS / foreign, "rb") as f, \
            fs.open_output_stream(posixpath.join(root, CHECKPOINTS, renamed), compression=None) as g:
        g.write(f.read())
    with pytest.raises(JobError, match=f"{CHECKPOINTS}/{renamed} does not hold what its name says"):
        CommitLog(uri).committed_ids()
    # Copied under its own (right) name: read, but its part's data is not here: dropped, not done.
    fs.delete_file(posixpath.join(root, CHECKPOINTS, renamed))
    with open(tmp_path / "other" / CHECKPOINTS / foreign, "rb") as f, \
            fs.open_output_stream(posixpath.join(root, CHECKPOINTS, foreign), compression=None) as g:
        g.write(f.read())
    assert CommitLog(uri).account(["a", "x"]).missing == ["x"]
    assert CommitLog(uri).resume(grace_s=0).done == {"a"}


def test_large_log_readers_make_no_python_object_per_id(uri, monkeypatch):
    """A checkpoint is Parquet, one row per id (and one per part); resume, recover and account
    answer from its Arrow columns, never through whole markers (a Python list per part)."""
    log = CommitLog(uri, compact_every=0)
    _commit_parts(log, 0, 20)
    checkpoint = log.compact()["checkpoint"]
    fs, root = filesystem(uri)
    with fs.open_input_file(posixpath.join(root, CHECKPOINTS, checkpoint)) as f:
        table = pq.read_table(f)
    assert checkpoint.endswith(".parquet") and table.num_rows == 20 + 20  # the part rows, then the id rows
    assert sorted(i for i in table.column("id").to_pylist() if i) == [f"img{i:04d}" for i in range(20)]
    _commit_parts(log, 20, 2)  # loose after it

    def whole(self):
        raise AssertionError("whole markers made")

    monkeypatch.setattr(LogView, "markers", whole)
    resumed = CommitLog(uri).resume(grace_s=0)
    assert sorted(resumed.done_ids.to_pylist()) == [f"img{i:04d}" for i in range(22)]
    assert resumed.undone(["img0003", "new"]) == [False, True]
    account = CommitLog(uri).account([f"img{i:04d}" for i in range(23)])
    assert (len(account.ok), account.errors, account.missing, account.duplicates) == (18, 4, ["img0022"], 0)


def test_an_id_in_two_parts_is_found_across_a_checkpoint_and_a_marker(uri):
    """A straggler's part sharing an id with a checkpointed part (it outlived the owner check):
    the recovery drops one of them, as with loose markers."""
    log = CommitLog(uri, compact_every=0)
    log.commit(_rows(["a", "b"], ["", ""]))
    log.compact()
    log.commit(_rows(["b", "c"], ["", ""]))
    assert CommitLog(uri).account(["a", "b", "c"]).duplicates == 1
    assert CommitLog(uri).recover()["parts_dropped"] == 1
    assert CommitLog(uri).account(["a", "b", "c"]).duplicates == 0


def _json_checkpoint(uri: str) -> str:
    """Compact the log as yesterday's version did: one gzipped JSON file of the markers."""
    log = CommitLog(uri)
    markers, earlier = log.markers(), _files(uri, CHECKPOINTS)
    data = gzip.compress(json.dumps({"format": JSON_FORMAT, "seq": 1, "merged": [], "markers": markers},
                                    sort_keys=True).encode(), mtime=0)
    name = checkpoint_name(1, data, "json.gz")
    log.fs.create_dir(log._path(CHECKPOINTS), recursive=True)
    log._put(CHECKPOINTS, name, data)
    for m in markers:
        log._delete(log._path("_commits", f"{m['name']}.json"))
    for checkpoint in earlier:
        log.fs.delete_file(log._path(CHECKPOINTS, checkpoint))
    return name


def test_a_log_compacted_in_the_earlier_json_format_reads_the_same_and_is_compacted_anew(uri):
    log = CommitLog(uri, compact_every=0)
    _commit_parts(log, 0, 12)
    expected = _read(uri)
    old = _json_checkpoint(uri)
    assert _files(uri, "_commits") == [] and _read(uri) == expected
    _commit_parts(log, 12, 2)
    assert CommitLog(uri).resume(grace_s=0).done == expected[1] | {"img0012", "img0013"}
    done = CommitLog(uri).compact()
    assert done["checkpoints_merged"] == 1 and done["checkpoint"].endswith(".parquet")
    assert _files(uri, CHECKPOINTS) == [done["checkpoint"]] and old not in _files(uri, CHECKPOINTS)
    assert CommitLog(uri).committed_ids() == expected[1] | {"img0012", "img0013"}
    # Alone, with nothing loose: still rewritten (once) by the next run's end.
    log = CommitLog(uri, compact_every=0)
    log.uncommit(lambda m: m["name"] in {m["name"] for m in log.markers() if "img0012" in m["errors"] + m["samples"]})
    _json_checkpoint(uri)
    assert CommitLog(uri).compact()["checkpoint"].endswith(".parquet") and CommitLog(uri).compact() is None


def test_a_tampered_checkpoint_is_refused(uri):
    log = CommitLog(uri, compact_every=0)
    _commit_parts(log, 0, 5)
    name = log.compact()["checkpoint"]
    fs, root = filesystem(uri)
    path = posixpath.join(root, CHECKPOINTS, name)
    with fs.open_input_stream(path) as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 1  # one bit of the ids' pages
    with fs.open_output_stream(path) as f:
        f.write(bytes(data))
    with pytest.raises(JobError, match=f"{CHECKPOINTS}/{name} does not hold what its name says"):
        CommitLog(uri).resume(grace_s=0)


@pytest.mark.parametrize("between", ["the two listings", "the listings and the reads"])
def test_a_reader_racing_a_compaction_reads_the_log_whole(uri, between):
    """A compaction that folds and deletes the markers (and the checkpoint) a reader listed,
    between its listing of `_commits/` and of `_checkpoints/`, or after both: it reads again."""
    log = CommitLog(uri, compact_every=0)
    _commit_parts(log, 0, 6)
    log.compact()
    _commit_parts(log, 6, 6)
    expected = _read(uri)
    reader, listings = CommitLog(uri), []
    reader._checkpoint(_files(uri, CHECKPOINTS)[0])  # read before: kept, as a reader of the last round has it
    names = reader._names

    def racing(folder, pattern=None):
        found = names(folder, pattern)
        listings.append(folder)
        if len(listings) == (1 if between == "the two listings" else 2):
            assert CommitLog(uri).compact()["markers_folded"] == 6
        return found

    reader._names = racing
    assert reader.committed_ids() == expected[1] and len(listings) == 4  # read twice
    assert reader.markers() == expected[0]


def _listings(monkeypatch) -> list[str]:
    """The folders the commit log lists from now on (by name)."""
    listed, listing = [], CommitLog._listing

    def spy(self, folder):
        listed.append(folder)
        return listing(self, folder)

    monkeypatch.setattr(CommitLog, "_listing", spy)
    return listed


def test_a_resume_looks_for_the_data_of_the_parts_committed_since_the_last_compaction_only(uri, monkeypatch):
    """A compaction flags the parts whose data files it listed in place; a resume looks for the
    files of the others only (at 40,000 parts, 80 listing pages fewer on S3), a HEAD each when
    that is fewer requests than the listings."""
    log = CommitLog(uri, compact_every=0)
    _commit_parts(log, 0, 20)
    assert log.compact()["placed"] == 20
    listed = _listings(monkeypatch)
    assert CommitLog(uri).resume(grace_s=0).done == {f"img{i:04d}" for i in range(20)}
    assert not set(listed) & {"samples", "errors"}

    # Parts committed since: their files are looked for, a HEAD each here (with pages of 10
    # names, listing the folders of 22 parts would take 6 requests, 2 HEADs a part 4).
    monkeypatch.setattr(checkpoints, "LIST_PAGE", 10)
    went = log.commit(_rows(["img0020"], [""]))
    _commit_parts(log, 21, 1)
    assert CommitLog(uri).recover()["committed_parts"] == 22
    assert not set(listed) & {"samples", "errors"}
    fs, root = filesystem(uri)
    fs.delete_file(posixpath.join(root, "samples", f"{went['name']}.parquet"))
    recovered = CommitLog(uri).recover()  # found by its HEAD (the compaction that drops it lists)
    assert (recovered["committed_parts"], recovered["parts_dropped"]) == (21, 1)


def test_a_part_whose_data_went_after_its_compaction_is_found_by_the_runs_end_and_done_again(uri):
    """What a compaction flags is trusted by a resume, never by a run's end: `account` and
    `finish` list the data folders, the ids of a part whose file went are missing, and the
    run's end takes its flag back, so the next resume drops the part and its ids are done
    again. A part whose file went before a compaction is never flagged."""
    log = CommitLog(uri, compact_every=0)
    kept, went = log.commit(_rows(["a"], [""])), log.commit(_rows(["b"], [""]))
    gone_early = log.commit(_rows(["c"], [""]))
    fs, root = filesystem(uri)
    fs.delete_file(posixpath.join(root, "samples", f"{gone_early['name']}.parquet"))
    assert log.compact()["placed"] == 2  # a and b, not c
    assert CommitLog(uri).resume(grace_s=0).recovered["parts_dropped"] == 1  # c: its files looked for

    fs.delete_file(posixpath.join(root, "samples", f"{went['name']}.parquet"))  # by hand, after the compaction
    run = CommitLog(uri)
    resumed = run.resume(grace_s=0)
    assert resumed.done == {"a", "b"} and resumed.recovered["parts_dropped"] == 0  # b trusted
    account = run.account(["a", "b", "c"])
    assert sorted(account.missing) == ["b", "c"] and account.ok == {"a"}
    with pytest.raises(JobError, match="missing"):
        run.finish({}, account, "inputs", grace_s=0)

    again = CommitLog(uri).resume(grace_s=0)
    assert again.done == {"a"} and again.recovered["parts_dropped"] == 1  # b, its flag taken back
    assert [m["name"] for m in CommitLog(uri).markers()] == [kept["name"]]


@pytest.mark.parametrize("cut", ["data deleted", "checkpoint written", "markers deleted"])
def test_a_removal_of_placed_parts_cut_short_is_finished_by_the_next_recovery(uri, cut, monkeypatch):
    """`retry_failed` removing a part a checkpoint flags in place, cut after its data went
    (before the checkpoint without it), after that checkpoint, or after the loose markers'
    deletion (the older checkpoint left): the next recovery never counts the part as done."""
    log = CommitLog(uri, compact_every=0)
    log.commit(_rows(["a", "b"], ["", ""]))
    log.commit(_rows(["d"], ["stage failed: x"]))
    assert log.compact()["placed"] == 2

    def die(*args, **kwargs):
        raise KeyboardInterrupt(cut)  # what a SIGKILL leaves: nothing after this step

    if cut == "data deleted":
        monkeypatch.setattr(CommitLog, "compact", die)
    else:
        monkeypatch.setattr(CompactedLog, "_step", staticmethod(lambda step: step == cut and die()))
    with pytest.raises(KeyboardInterrupt):
        CommitLog(uri).uncommit(stage_failure)
    monkeypatch.undo()
    CommitLog(uri).recover()
    assert CommitLog(uri).resume(grace_s=0).done == {"a", "b"}
    assert CommitLog(uri).account(["a", "b", "d"]).missing == ["d"]


class _Counted:
    """A log's filesystem that records what it is asked: the files read whole, the files whose
    Parquet footer is read, the files written (by folder), the folders listed and the files
    looked for one by one (HEADs)."""

    def __init__(self, fs: pafs.FileSystem, root: str):
        self.fs, self.root = fs, root.rstrip("/")
        self.read, self.footers, self.written, self.listed, self.heads = [], [], [], [], 0

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def _rel(self, path: str) -> str:
        return posixpath.relpath(path, self.root)

    def get_file_info(self, what):
        if isinstance(what, pafs.FileSelector):
            self.listed.append(self._rel(what.base_dir))
        else:
            self.heads += len(what) if isinstance(what, list) else 1
        return self.fs.get_file_info(what)

    def open_input_stream(self, path, *args, **kwargs):
        self.read.append(posixpath.dirname(self._rel(path)))
        return self.fs.open_input_stream(path, *args, **kwargs)

    def open_input_file(self, path, *args, **kwargs):  # what a Parquet footer is read through
        self.footers.append(posixpath.dirname(self._rel(path)))
        return self.fs.open_input_file(path, *args, **kwargs)

    def open_output_stream(self, path, *args, **kwargs):
        self.written.append(posixpath.dirname(self._rel(path)))
        return self.fs.open_output_stream(path, *args, **kwargs)


def _counted(log: CommitLog) -> _Counted:
    log.fs = _Counted(log.fs, log.root)
    return log.fs


def test_a_writers_compaction_reads_and_writes_the_parts_committed_since_only(uri):
    """A writer's compaction (every `compact_every` commits) folds the loose markers into a
    checkpoint of their parts alone: the older checkpoint is neither read nor rewritten, the
    data folders are not listed (a HEAD per file of the new parts flags them `placed`)."""
    log = CommitLog(uri, compact_every=0)
    _commit_parts(log, 0, 60)
    big = log.compact()["checkpoint"]  # 60 parts (a run's end, say)
    _commit_parts(log, 60, 5)
    expected = _read(uri)
    writer = CommitLog(uri)
    counted = _counted(writer)
    done = writer.fold()
    assert (done["parts"], done["markers_folded"], done["placed"], done["merges"]) == (5, 5, 5, [])
    assert counted.read == ["_commits"] * 5  # the five markers, and not the checkpoint
    assert counted.footers == [CHECKPOINTS]  # its part count only, for the size tiers
    assert set(counted.written) == {CHECKPOINTS} and len(counted.written) == 1
    assert sorted(counted.listed) == ["_checkpoints", "_commits"] and counted.heads == 2 * 5
    assert _files(uri, "_commits") == [] and _files(uri, CHECKPOINTS) == sorted([big, done["checkpoint"]])
    assert _read(uri) == expected
    # A resume trusts both checkpoints' flags: no data folder listed, no HEAD.
    resumed = CommitLog(uri)
    counted = _counted(resumed)
    assert resumed.resume(grace_s=0).done == expected[1]
    assert not set(counted.listed) & {"samples", "errors"} and counted.heads <= 1  # (the owner's folder on a disk)


def test_checkpoints_merge_in_size_tiers_so_a_run_keeps_few_and_rewrites_each_part_a_few_times(tmp_path, monkeypatch):
    """A fold after every commit (`compact_every=1`), 64 of them: four checkpoints of one size
    tier become one, so at most 3 a tier are ever present (a logarithmic count) and each part
    is written 1 + log4(64) = 4 times (256 part rows; folds rewriting the whole log would
    write 64 x 65 / 2 = 2,080)."""
    uri = str(tmp_path / "out")
    writes, encode = [], checkpoints.encode

    def counting(info, parts, ids, placed):
        writes.append(len(parts))
        return encode(info, parts, ids, placed)

    monkeypatch.setattr(checkpoints, "encode", counting)
    log = CommitLog(uri, compact_every=1)
    present = []
    for i in range(64):
        _commit_parts(log, i, 1)
        present.append(len(_files(uri, CHECKPOINTS)))
    assert max(present) <= 3 * 3 and present[-1] == 1, present  # at most 3 in each of tiers 0-2
    assert sum(writes) <= 64 * 4, writes  # a fold, then 3 merges (4, 16, 64 parts) a part
    assert CommitLog(uri).committed_ids() == {f"img{i:04d}" for i in range(64)}
    account = CommitLog(uri).account([f"img{i:04d}" for i in range(64)])
    assert (len(account.ok), account.errors, account.missing, account.duplicates) == (54, 10, [], 0)
    assert _files(uri, "_commits") == []


@pytest.mark.parametrize("cut", ["read", "checkpoint written", "markers deleted", "merged", "merged deleted"])
def test_a_fold_or_a_merge_cut_at_any_step_leaves_a_log_that_reads_the_same(uri, cut, monkeypatch):
    """Three folds, then a fourth whose checkpoint makes four of one tier: merged into one.
    Cut at each step (a SIGKILL), the log reads the same; a part committed again since its
    fold (an error, then a sample) is read as its newest copy before and after the merge."""
    log = CommitLog(uri, compact_every=0)
    for start in (0, 3, 6):
        _commit_parts(log, start, 3)
        log.fold()
    _commit_parts(log, 9, 2)
    log.commit(_rows(["img0000"], [""]))  # in the first fold as an error: now a sample, loose
    expected = _read(uri)
    assert expected[2]["errors"] == {"not an image": 1} and len(_files(uri, CHECKPOINTS)) == 3

    def die(step):
        if step == cut:
            raise KeyboardInterrupt(f"killed at {step!r}")

    monkeypatch.setattr(CompactedLog, "_step", staticmethod(die))
    with pytest.raises(KeyboardInterrupt):
        CommitLog(uri).fold()
    assert _read(uri) == expected
    monkeypatch.undo()
    if cut.startswith("merged"):  # the fold landed: its merge is what was cut
        assert _files(uri, "_commits") == []
    CommitLog(uri).compact()  # what a run's end does (nothing when the merge was cut after its deletions)
    assert _read(uri) == expected and len(_files(uri, CHECKPOINTS)) == 1


def test_an_uncut_fold_merges_four_of_a_tier_into_one_that_reads_the_same(uri):
    log = CommitLog(uri, compact_every=0)
    for start in (0, 3, 6):
        _commit_parts(log, start, 3)
        log.fold()
    _commit_parts(log, 9, 2)
    log.commit(_rows(["img0000"], [""]))
    expected = _read(uri)
    done = CommitLog(uri).fold()
    (merge,) = done["merges"]
    assert merge["checkpoints_merged"] == 4 and merge["parts"] == 11
    assert _files(uri, CHECKPOINTS) == [merge["checkpoint"]] and _read(uri) == expected


def test_an_id_in_two_parts_is_found_across_two_checkpoints(uri):
    """Each fold knows only whether its own ids are distinct; a reader of several checkpoints
    looks the ids of all but the largest up in it (and hashes those), so a part of one
    checkpoint sharing an id with a part of another is found, and the recovery drops one."""
    log = CommitLog(uri, compact_every=0)
    _commit_parts(log, 0, 6)
    log.commit(_rows(["a", "b"], ["", ""]))
    log.fold()
    log.commit(_rows(["b", "c"], ["", ""]))
    log.fold()
    assert len(_files(uri, CHECKPOINTS)) == 2 and _files(uri, "_commits") == []
    assert CommitLog(uri).account(["a", "b", "c"]).duplicates == 1
    assert CommitLog(uri).recover()["parts_dropped"] == 1
    assert CommitLog(uri).account(["a", "b", "c"]).duplicates == 0


def test_a_merge_keeps_hidden_what_a_removal_dropped_from_an_older_checkpoint(uri, monkeypatch):
    """A removal's checkpoint (it merged the older one, without the parts removed) cut short
    before the older file went: a later merge of the newer checkpoints only (the older one in
    a higher tier) merges the older one too, so the removed part never reads as committed."""
    log = CommitLog(uri, compact_every=0)
    log.commit(_rows(["a", "b"], ["", ""]))
    log.commit(_rows(["d"], ["stage failed: x"]))
    (old,) = [log.compact()["checkpoint"]]
    monkeypatch.setattr(CompactedLog, "_step", staticmethod(
        lambda step: step == "markers deleted" and (_ for _ in ()).throw(KeyboardInterrupt(step))))
    with pytest.raises(KeyboardInterrupt):
        CommitLog(uri).uncommit(stage_failure)  # the removal's checkpoint landed, the old one is left
    monkeypatch.undo()
    removal = [name for name in _files(uri, CHECKPOINTS) if name != old]
    log.commit(_rows(["e"], [""]))
    fold = log.fold()["checkpoint"]
    assert CommitLog(uri).committed_ids() == {"a", "b", "e"}
    writer = CommitLog(uri)
    merge = writer._merge(sorted([*removal, fold]), set(_files(uri, CHECKPOINTS)))
    assert old in merge["gone"] and _files(uri, CHECKPOINTS) == [merge["checkpoint"]]
    assert CommitLog(uri).committed_ids() == {"a", "b", "e"}
    assert CommitLog(uri).account(["a", "b", "d", "e"]).missing == ["d"]


def test_writers_folds_leave_a_checkpoint_of_the_earlier_json_format_to_the_runs_end(tmp_path):
    """A checkpoint of the first format has no part count in a footer: the folds merge among
    themselves and leave it, the log reads the same, and the run's end rewrites it."""
    uri = str(tmp_path / "out")
    log = CommitLog(uri, compact_every=0)
    _commit_parts(log, 0, 12)
    old = _json_checkpoint(uri)
    for i in range(12, 16):
        _commit_parts(log, i, 1)
        log.fold()
    (merged,) = [name for name in _files(uri, CHECKPOINTS) if name != old]
    assert old in _files(uri, CHECKPOINTS) and len(_files(uri, CHECKPOINTS)) == 2
    assert CommitLog(uri).committed_ids() == {f"img{i:04d}" for i in range(16)}
    done = CommitLog(uri).compact()
    assert done["checkpoints_merged"] == 2 and _files(uri, CHECKPOINTS) == [done["checkpoint"]]
    assert CommitLog(uri).committed_ids() == {f"img{i:04d}" for i in range(16)}
