import json
import posixpath
import threading
import uuid
from collections import Counter

import pyarrow.parquet as pq
import pytest
from helpers import sample_rows as _rows
from pyarrow import fs as pafs

from blipinpaint import commit_log
from blipinpaint.commit_log import CommitLog
from blipinpaint.commits import Superseded, part_name
from blipinpaint.errors import JobError
from blipinpaint.reader import read_sorted
from blipinpaint.records import ERROR_SCHEMA, SAMPLE_SCHEMA
from blipinpaint.storage import filesystem


class Out:
    """An output folder on a disk or in a bucket, seen through its filesystem: what a reader
    finds, and the crashes a test leaves behind (a move is a copy and a delete on S3)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem(uri)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def files(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File)

    def ids(self, folder: str) -> list[str]:
        """The ids a reader of `folder` sees: every Parquet file in it."""
        return sorted(i for name in self.files(folder) if name.endswith(".parquet")
                      for i in pq.read_table(self.path(folder, name), filesystem=self.fs).column("id").to_pylist())

    def move(self, source: str, destination: str) -> None:
        self.fs.move(self.path(source), self.path(destination))

    def copy(self, source: str, destination: str) -> None:
        self.fs.copy_file(self.path(source), self.path(destination))

    def delete(self, name: str) -> None:
        self.fs.delete_file(self.path(name))


@pytest.fixture(params=["disk", "bucket"])
def out(request, tmp_path) -> Out:
    """The protocol runs against a local disk and against an S3 endpoint (its semantics: no
    rename, a move is a copy then a delete)."""
    if request.param == "disk":
        return Out(str(tmp_path))
    return Out(request.getfixturevalue("s3")(f"writer-{uuid.uuid4().hex[:12]}") + "/out")


def test_commit_splits_samples_and_errors(out):
    log = CommitLog(out.uri)
    marker = log.commit(_rows(["a", "b", "c"], ["", "not an image: x", ""]))
    assert out.ids("samples") == ["a", "c"] and out.ids("errors") == ["b"]
    for folder, schema in (("samples", SAMPLE_SCHEMA), ("errors", ERROR_SCHEMA)):
        (name,) = out.files(folder)
        assert pq.read_schema(out.path(folder, name), filesystem=out.fs).names == schema.names
    assert out.files("_staging/samples") == out.files("_staging/errors") == []
    assert marker["seconds"] == {"captioner": pytest.approx(1.5)} and marker["retries"] == {"captioner": 1}
    assert log.committed_ids() == {"a", "b", "c"}


def test_writing_the_same_rows_again_replaces_them(out):
    log = CommitLog(out.uri)
    log.commit(_rows(["a", "b"], ["", ""]))
    log.commit(_rows(["b", "a"], ["", ""]))  # a retried write task
    assert out.ids("samples") == ["a", "b"] and len(log.markers()) == 1


def test_recover_undoes_parts_that_never_committed(out):
    log = CommitLog(out.uri)
    log.commit(_rows(["a"], [""]))
    marker = log.commit(_rows(["b"], [""]))
    # Crash after the staged file was written, before the marker: move the file back, drop the
    # marker (on a disk, a marker cut short before its rename into place is a dot-file; a PUT
    # to a bucket lands whole or not at all, and the recovery looks for no dot-files there).
    out.move(f"samples/{marker['name']}.parquet", f"_staging/samples/{marker['staged']['samples']}")
    on_disk = "://" not in out.uri
    if on_disk:
        out.move(f"_commits/{marker['name']}.json", f"_commits/.{marker['name']}.json.tmp")
    else:
        out.delete(f"_commits/{marker['name']}.json")
    assert log.recover() == {"committed_parts": 1, "orphans_removed": 1 + on_disk, "parts_dropped": 0}
    assert out.ids("samples") == ["a"] and log.committed_ids() == {"a"}
    assert out.files("_staging/samples") == [] and out.files("_commits") == [f"{log.markers()[0]['name']}.json"]


def test_recover_finishes_parts_that_committed(out):
    log = CommitLog(out.uri)
    marker = log.commit(_rows(["a", "b"], ["", "corrupt image: x"]))
    # Crash after the marker, before the files moved into place.
    for folder in ("samples", "errors"):
        out.move(f"{folder}/{marker['name']}.parquet", f"_staging/{folder}/{marker['staged'][folder]}")
    assert out.ids("samples") == []  # readers never see staged data
    log.recover()
    assert out.ids("samples") == ["a"] and out.ids("errors") == ["b"]


def test_recover_finishes_a_move_cut_between_its_copy_and_its_delete(out):
    """S3 has no rename: a publish is a copy and then a delete. Killed between the two, the
    file is both published and staged; recovery finishes the move and nothing is read twice."""
    log = CommitLog(out.uri)
    marker = log.commit(_rows(["a", "b"], ["", ""]))
    out.copy(f"samples/{marker['name']}.parquet", f"_staging/samples/{marker['staged']['samples']}")
    assert out.ids("samples") == ["a", "b"]
    assert log.recover() == {"committed_parts": 1, "orphans_removed": 0, "parts_dropped": 0}
    assert out.ids("samples") == ["a", "b"] and out.files("_staging/samples") == []


def test_all_error_batches_write_no_sample_file(out):
    CommitLog(out.uri).commit(_rows(["a", "b"], ["empty file: 0 bytes", "not an image: x"]))
    assert out.files("samples") == [] and out.ids("errors") == ["a", "b"]


def test_a_writer_of_a_run_that_was_taken_over_cannot_commit(out):
    """A killed driver's tasks still in flight must not commit into the run that resumed it."""
    old = CommitLog(out.uri)
    old.take_over(grace_s=0)
    old.commit(_rows(["a"], [""]))
    new = CommitLog(out.uri)
    new.take_over(grace_s=0)
    with pytest.raises(Superseded, match="another run"):
        old.commit(_rows(["b"], [""]))  # b is still pending for the new run: it must not land twice
    assert new.committed_ids() == {"a"} and out.ids("samples") == ["a"]
    # The straggler took its staged file back: the new owner recovered before it wrote, and
    # would otherwise finish with a stray file in its folder.
    assert out.files("_staging/samples") == []
    assert new.recover()["orphans_removed"] == 0
    new.commit(_rows(["b"], [""]))
    assert out.ids("samples") == ["a", "b"]
    assert [n for n in out.files("") if n.endswith(".tmp")] == []  # the owner file, written whole


class _ReadsOwnerOnEveryWrite:
    """A filesystem that, whenever a file is opened for writing, reads the folder's owner
    file the way a concurrent commit does: what a task in flight sees during a take-over."""

    def __init__(self, fs, owner_file, seen):
        self._fs, self._owner_file, self._seen = fs, owner_file, seen

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open_output_stream(self, path, *args, **kwargs):
        stream = self._fs.open_output_stream(path, *args, **kwargs)
        self._seen.append(self._owner_file.read_text())
        return stream


def test_a_commit_never_reads_a_half_written_owner(tmp_path):
    """Tasks read the owner file on every commit while a new run takes over or a run
    releases the folder; a truncated file would crash them instead of stopping them."""
    CommitLog(str(tmp_path)).take_over(grace_s=0)
    seen = []
    log = CommitLog(str(tmp_path))
    log.fs = _ReadsOwnerOnEveryWrite(log.fs, tmp_path / "_owner.json", seen)
    log.take_over(grace_s=0)
    log.release()
    assert len(seen) == 2
    for text in seen:
        assert json.loads(text)["token"]  # always a whole owner, the old or the new


def test_a_run_that_was_taken_over_does_not_release_the_new_owners_folder(tmp_path, monkeypatch):
    old = CommitLog(str(tmp_path))
    old.take_over(grace_s=0)
    new = CommitLog(str(tmp_path))
    token = new.take_over(grace_s=0)
    old.release()  # the old driver outlived its take-over and finished
    assert json.loads((tmp_path / "_owner.json").read_text()) == {"token": token, "compact_every": 500}
    new.commit(_rows(["a"], [""]))  # the new run still owns the folder
    waits = []
    monkeypatch.setattr(CommitLog, "_wait", staticmethod(waits.append))
    CommitLog(str(tmp_path)).take_over(grace_s=3)
    assert waits == [3]  # the new run never finished: its stragglers are waited for


def test_taking_over_waits_only_after_an_unfinished_run(tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(CommitLog, "_wait", staticmethod(waits.append))
    first = CommitLog(str(tmp_path))
    first.take_over(grace_s=0.5)
    assert waits == []  # nobody wrote here before
    CommitLog(str(tmp_path)).take_over(grace_s=0.5)  # the first run never said it finished
    assert waits == [0.5]
    second = CommitLog(str(tmp_path))
    second.take_over(grace_s=0)
    second.release()
    CommitLog(str(tmp_path)).take_over(grace_s=5)
    assert waits == [0.5, 0]  # the second run finished: no wait for it


def test_uncommitted_parts_become_pending_and_a_cut_short_removal_is_finished(out):
    log = CommitLog(out.uri)
    log.commit(_rows(["a", "b"], ["", ""]))
    failed = log.commit(_rows(["c"], ["stage failed: inpainter worker died on this batch 3 times"]))
    assert log.uncommit(lambda m: m["error_kinds"] == ["stage failed"]).to_pylist() == ["c"]
    assert log.committed_ids() == {"a", "b"} and out.ids("errors") == []
    # Removal cut short after the data went, before the marker: recovery drops the marker.
    again = log.commit(_rows(["c"], ["stage failed: again"]))
    assert again["name"] == failed["name"]
    out.delete(f"errors/{again['name']}.parquet")
    assert log.recover()["parts_dropped"] == 1 and log.committed_ids() == {"a", "b"}
    assert out.ids("samples") == ["a", "b"]


def test_recover_keeps_one_part_per_id_and_frees_the_rest(out):
    """Two parts holding one id (a straggler that outlived the owner check): the part with
    samples stays, the other goes, and its ids found nowhere else are pending again."""
    log = CommitLog(out.uri)
    log.commit(_rows(["a", "b"], ["", ""]))
    log.commit(_rows(["b", "c"], ["stage failed: x", "stage failed: x"]))
    assert log.recover()["parts_dropped"] == 1
    assert log.committed_ids() == {"a", "b"}  # c is to be redone
    assert out.ids("samples") == ["a", "b"] and out.ids("errors") == []


def test_account_places_every_listed_id_once(out):
    """A sample, an error by its kind, missing, or duplicated: where each listed id stands."""
    log = CommitLog(out.uri)
    log.commit(_rows(["a", "b"], ["", "not an image: x"]))
    log.commit(_rows(["b", "c"], ["too small: 4x4 pixels", ""]))  # `b` a second time
    account = log.account(["a", "b", "c", "d"])
    assert account.ok == {"a", "c"} and account.missing == ["d"] and account.duplicates == 1
    assert dict(account.errors_by_reason) == {"not an image": 1, "too small": 1} and account.errors == 2
    assert not account.complete and account.rows == 4
    assert account.seconds["captioner"] == pytest.approx(4 * 0.5) and account.retries["captioner"] == 2
    assert account.stages()["captioner"] == {"busy_s": 2.0, "rows_per_s_per_worker": 2.0, "retries": 2}
    assert log.account(["a", "c"]).ok == {"a", "c"}  # ids not listed do not count as errors
    assert dict(log.account(["a", "c"]).errors_by_reason) == {}


def test_finish_marks_success_only_when_every_id_is_there(out):
    log = CommitLog(out.uri)
    log.take_over()
    log.commit(_rows(["a", "b"], ["", ""]))
    with pytest.raises(JobError, match=r"1 inputs missing, 0 duplicated; run the same command again"):
        log.finish({"n": 1}, log.account(["a", "b", "c"]), "inputs")
    assert "_SUCCESS" not in out.files("") and json.loads(out.fs.open_input_stream(out.path("stats.json")).read())
    assert "_released.json" in out.files("")  # released either way: the next run need not wait
    log.finish({"n": 2}, log.account(["a", "b"]), "inputs")
    assert "_SUCCESS" in out.files("")


def test_resume_makes_failed_batches_pending_again_only_when_asked(out):
    log = CommitLog(out.uri)
    log.commit(_rows(["a"], [""]))
    log.commit(_rows(["b", "c"], ["stage failed: inpainter raised RuntimeError: x"] * 2))
    log.commit(_rows(["d"], ["not an image: x"]))  # the image's fault: never retried
    first = CommitLog(out.uri)
    kept = first.resume(retry_failed=False)
    first.release()  # a finished run: the next one need not wait for its stragglers
    assert kept.done == {"a", "b", "c", "d"} and kept.retried == [] and kept.recovered["committed_parts"] == 3
    retried = CommitLog(out.uri).resume(retry_failed=True)
    assert sorted(retried.retried) == ["b", "c"] and retried.done == {"a", "d"}
    assert retried.owner != kept.owner and CommitLog(out.uri, owner=retried.owner).owns()


class _Straggler(CommitLog):
    """A writer of a run that is being taken over, stopped where a slow task stops: before its
    owner check (`pause="before check"`) or right after it passed (`"after check"`), until
    `go`; then, with its marker written, before its files move, until `publish`. Its commit
    runs in a thread (`start`); what it raised is `error`."""

    def __init__(self, uri: str, pause: str):
        super().__init__(uri)
        self.take_over(grace_s=0)  # the run the straggler belongs to owns the folder
        self.pause, self.error, self.thread = pause, None, None
        self.paused, self.go, self.marked, self.publish = (threading.Event() for _ in range(4))

    def start(self, table) -> None:
        def run():
            try:
                self.commit(table)
            except Exception as err:  # noqa: BLE001 - what the task would raise, looked at by the test
                self.error = err
            finally:
                self.paused.set()
                self.marked.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.paused.wait(30)

    def check_owner(self) -> None:
        if self.pause == "before check":
            self._stop()
        super().check_owner()
        if self.pause == "after check":
            self._stop()

    def _stop(self) -> None:
        self.paused.set()
        assert self.go.wait(30)

    def _publish(self, marker: dict) -> None:
        self.marked.set()
        assert self.publish.wait(30)
        super()._publish(marker)

    def finish_commit(self) -> None:
        self.go.set()
        self.publish.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


class _RacedRecovery(CommitLog):
    """A new run whose recovery lists the markers, and the straggler's marker lands right
    after that listing, before the staged files no listed marker names are removed."""

    def __init__(self, uri: str, straggler: _Straggler):
        super().__init__(uri)
        self.straggler, self.raced = straggler, False

    def _read_log(self, skip=(), **kwargs):  # what every read of the markers goes through
        found = super()._read_log(skip, **kwargs)
        if not self.raced:
            self.raced = True
            self.straggler.go.set()
            assert self.straggler.marked.wait(30)
        return found


def _clock(monkeypatch, out: Out, age_s: float) -> None:
    """The clock a recovery reads: `age_s` after the one staged sample file was written (by
    the store's time for it). No test waits for real: the take-over's waits are recorded."""
    (info,) = out.fs.get_file_info(pafs.FileSelector(out.path("_staging/samples")))
    monkeypatch.setattr(CommitLog, "_now", staticmethod(lambda: info.mtime.timestamp() + age_s), raising=False)


def test_a_marker_whose_data_a_recovery_removed_is_never_taken_for_done(out, monkeypatch):
    """A task of a killed run passes its owner check, then stalls past the take-over's wait;
    its marker lands after the new run's recovery listed the markers, so the recovery
    removes its staged file as an orphan. The marker then names data that exists nowhere:
    the straggler says so, the new run ends without `_SUCCESS` and with those ids missing,
    and the next run drops the marker and redoes them."""
    straggler = _Straggler(out.uri, pause="after check")
    straggler.start(_rows(["a", "b"], ["", ""]))
    _clock(monkeypatch, out, age_s=5 + 1)  # staged before its check, so before the take-over's wait
    waits = []
    monkeypatch.setattr(CommitLog, "_wait", staticmethod(waits.append))
    new = _RacedRecovery(out.uri, straggler)
    resumed = new.resume()
    assert waits == [5] and out.files("_staging/samples") == []  # old enough: removed as an orphan
    straggler.finish_commit()
    assert isinstance(straggler.error, JobError) and "gone" in str(straggler.error)  # not a silent skip
    assert resumed.done == {"a", "b"} and out.ids("samples") == []  # its marker landed before this listing
    with pytest.raises(JobError, match="2 inputs missing, 0 duplicated"):
        new.finish({}, new.account(["a", "b"]), "inputs")
    assert "_SUCCESS" not in out.files("")
    again = CommitLog(out.uri)
    redo = again.resume()
    assert redo.recovered["parts_dropped"] == 1 and redo.done == set()
    again.commit(_rows(["a", "b"], ["", ""]))
    again.finish({}, again.account(["a", "b"]), "inputs")
    assert "_SUCCESS" in out.files("") and out.ids("samples") == ["a", "b"]


def test_a_staged_file_younger_than_the_grace_outlives_the_recovery_that_races_its_writer(out, monkeypatch):
    """A task of the previous run stages its file during the take-over's wait and has not yet
    checked the owner when the recovery runs: the recovery leaves the file (younger than the
    grace) to its writer, which is refused at its check and takes the file back itself."""
    straggler = _Straggler(out.uri, pause="before check")
    new = CommitLog(out.uri)
    waits = []

    def wait(seconds):  # the straggler stages during the take-over's wait, which ends a second later
        straggler.start(_rows(["a"], [""]))
        _clock(monkeypatch, out, age_s=1)
        waits.append(seconds)

    monkeypatch.setattr(CommitLog, "_wait", staticmethod(wait))
    resumed = new.resume()
    assert waits == [5] and resumed.done == set()
    assert len(out.files("_staging/samples")) == 1  # left to its writer
    straggler.finish_commit()
    assert isinstance(straggler.error, Superseded)
    assert out.files("_staging/samples") == [] and new.committed_ids() == set() and out.ids("samples") == []


def test_a_file_left_to_a_writer_that_then_died_is_gone_by_the_end_of_the_run(out, monkeypatch):
    """The same, but the writer dies before its check (its job's processes killed): the file
    the recovery left to it is removed when the new run finishes, before `_SUCCESS`, so a
    finished folder holds no staged file of anyone's."""
    straggler = _Straggler(out.uri, pause="before check")
    new = CommitLog(out.uri)

    def wait(seconds):
        straggler.start(_rows(["a"], [""]))
        _clock(monkeypatch, out, age_s=1)

    monkeypatch.setattr(CommitLog, "_wait", staticmethod(wait))
    new.resume()
    assert len(out.files("_staging/samples")) == 1  # left to its writer, which never comes back
    new.commit(_rows(["a"], [""]))
    _clock(monkeypatch, out, age_s=60)  # the end of the run: long past the grace
    new.finish({}, new.account(["a"]), "inputs")
    assert out.files("_staging/samples") == [] and "_SUCCESS" in out.files("") and out.ids("samples") == ["a"]


def test_a_straggler_whose_staged_file_a_recovery_removed_is_still_refused(out, monkeypatch):
    """The same, with the file staged before the take-over: older than the grace when the
    recovery runs, so removed there; the writer is refused at its check all the same."""
    straggler = _Straggler(out.uri, pause="before check")
    straggler.start(_rows(["a"], [""]))
    _clock(monkeypatch, out, age_s=5 + 1)
    waits = []
    monkeypatch.setattr(CommitLog, "_wait", staticmethod(waits.append))
    CommitLog(out.uri).resume()
    assert waits == [5] and out.files("_staging/samples") == []
    straggler.finish_commit()
    assert isinstance(straggler.error, Superseded)  # not the FileNotFoundError of taking back a removed file


def test_finish_checks_the_data_is_still_there(out):
    """`_SUCCESS` only when every committed part's files are in place when it is written."""
    log = CommitLog(out.uri)
    log.take_over(grace_s=0)
    marker = log.commit(_rows(["a", "b"], ["", "not an image: x"]))
    log.commit(_rows(["c"], [""]))
    account = log.account(["a", "b", "c"])
    assert account.complete
    out.delete(f"errors/{marker['name']}.parquet")  # gone between the account and the end of the run
    with pytest.raises(JobError, match="2 inputs missing"):
        log.finish({}, account, "inputs")
    assert "_SUCCESS" not in out.files("")


class _CountsRequests:
    """A filesystem that counts what is asked of it, by kind of request."""

    def __init__(self, fs):
        self._fs, self.calls = fs, Counter()

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def get_file_info(self, what):
        self.calls["listing" if isinstance(what, pafs.FileSelector) else "file info"] += 1
        return self._fs.get_file_info(what)

    def open_input_stream(self, path, *args, **kwargs):
        self.calls["read " + posixpath.basename(posixpath.dirname(path))] += 1
        return self._fs.open_input_stream(path, *args, **kwargs)


def test_account_counts_the_ids_of_parts_whose_data_is_gone_as_missing(out):
    log = CommitLog(out.uri)
    gone = log.commit(_rows(["a", "b"], ["", "not an image: x"]))
    log.commit(_rows(["c"], [""]))
    out.delete(f"samples/{gone['name']}.parquet")
    log.fs = _CountsRequests(log.fs)
    account = log.account(["a", "b", "c"])
    assert account.missing == ["a", "b"] and account.ok == {"c"} and not account.complete
    # The markers (after a listing of them and one of the checkpoints), and one listing per
    # folder of data: no request per file.
    assert log.fs.calls == {"listing": 4, "read _commits": 2}
    assert CommitLog(out.uri).recover()["parts_dropped"] == 1  # the next run redoes them
    assert log.committed_ids() == {"c"} and out.ids("errors") == []


def test_parts_of_different_ids_never_share_a_name(out):
    """A part's name is a digest of its ids, unambiguous even for ids holding a newline (a
    file name may): two batches never replace each other."""
    assert part_name(["a.jpg", "b.jpg"]) != part_name(["a.jpg\nb.jpg"])
    assert part_name(["b", "a"]) == part_name(["a", "b"])  # a retried batch, in any order: the same part
    log = CommitLog(out.uri)
    log.commit(_rows(["a.jpg", "b.jpg"], ["", ""]))
    log.commit(_rows(["a.jpg\nb.jpg"], [""]))
    assert out.ids("samples") == ["a.jpg", "a.jpg\nb.jpg", "b.jpg"] and len(log.markers()) == 2
    assert log.account(["a.jpg", "b.jpg", "a.jpg\nb.jpg"]).complete


def test_a_folder_written_under_the_earlier_part_names_resumes(out, monkeypatch):
    """Parts committed under the earlier naming (a digest of the ids joined by newlines) are
    found by their markers, which carry their names: nothing recomputes a committed part's name."""
    import hashlib

    def earlier(ids):
        return "part-" + hashlib.blake2b("\n".join(sorted(ids)).encode(), digest_size=10).hexdigest()

    monkeypatch.setattr(commit_log, "part_name", earlier)
    log = CommitLog(out.uri)
    log.take_over(grace_s=0)
    log.commit(_rows(["a", "b"], ["", ""]))
    failed = log.commit(_rows(["c"], ["stage failed: x"]))
    monkeypatch.undo()
    assert failed["name"] == earlier(["c"]) != part_name(["c"])
    log = CommitLog(out.uri)
    resumed = log.resume(retry_failed=True)
    assert resumed.recovered["committed_parts"] == 2 and resumed.retried == ["c"] and resumed.done == {"a", "b"}
    log.commit(_rows(["c"], [""]))
    assert read_sorted(out.uri, ["a", "b", "c"], ["caption"])["id"].tolist() == ["a", "b", "c"]
    log.finish({}, log.account(["a", "b", "c"]), "inputs")
    assert "_SUCCESS" in out.files("") and out.ids("errors") == []


def test_a_part_committed_again_in_the_other_folder_leaves_nothing_behind(out):
    """A batch committed as error rows, then again as samples (the same part: a task retried
    after its stage recovered): its ids stand in one folder only. A commit cut short before
    the other folder's file went is finished by `recover`, and `uncommit` removes both."""
    log = CommitLog(out.uri)
    first = log.commit(_rows(["a", "b"], ["stage failed: x"] * 2))
    out.copy(f"errors/{first['name']}.parquet", "earlier.parquet")
    again = log.commit(_rows(["a", "b"], ["", ""]))
    assert again["name"] == first["name"]
    assert out.ids("samples") == ["a", "b"] and out.ids("errors") == []
    out.copy("earlier.parquet", f"errors/{first['name']}.parquet")  # killed before it went
    log.recover()
    assert out.ids("samples") == ["a", "b"] and out.ids("errors") == []
    out.copy("earlier.parquet", f"errors/{first['name']}.parquet")
    assert sorted(log.uncommit(lambda m: True).to_pylist()) == ["a", "b"]
    assert out.ids("samples") == out.ids("errors") == [] and log.markers() == []


def test_account_says_why_batches_ran_again_by_stage_and_cause(tmp_path):
    """A part's rows carry its batch's runs again by cause (`reruns_<stage>_<token>`, summed
    per part); the account sums them over the parts, and tells the attempts a stage raised
    on from those its workers died on (both in `retries_<stage>`)."""
    import pyarrow as pa

    def rows(ids, **counts):  # each count on the part's first row, as `batches.count_once` puts it
        table = _rows(ids, [""] * len(ids))  # its captioner raised once (`retries_captioner` 1)
        for column, n in counts.items():
            table = table.append_column(column, pa.array([n] + [0] * (len(ids) - 1), pa.int64()))
        return table

    log = CommitLog(str(tmp_path))
    marker = log.commit(rows(["a", "b"], retries_inpainter=2, reruns_inpainter_node=1, reruns_inpainter_worker=1,
                             reruns_commit_output=1, reruns_commit_node=0))
    assert marker["reruns"] == {"inpainter": {"node_lost": 1, "worker_died": 1},
                                "commit": {"output_lost": 1, "node_lost": 0}}
    log.commit(rows(["c"], retries_inpainter=1, reruns_inpainter_node=1))
    assert log.account(["a", "b", "c"]).reruns_by_cause() == {
        "captioner": {"raised": 2, "worker_died": 0, "node_lost": 0, "output_lost": 0},
        "commit": {"raised": 0, "worker_died": 0, "node_lost": 0, "output_lost": 1},
        "inpainter": {"raised": 0, "worker_died": 1, "node_lost": 2, "output_lost": 0}}
