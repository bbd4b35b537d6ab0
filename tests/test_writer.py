import json

import pyarrow.parquet as pq
import pytest
from helpers import sample_rows as _rows

from blipinpaint.records import ERROR_SCHEMA, SAMPLE_SCHEMA
from blipinpaint.writer import CommitLog, Superseded


def _read(path):
    return sorted(pq.read_table(path).column("id").to_pylist()) if path.exists() and any(path.iterdir()) else []


def test_commit_splits_samples_and_errors(tmp_path):
    log = CommitLog(str(tmp_path))
    marker = log.commit(_rows(["a", "b", "c"], ["", "not an image: x", ""]))
    assert _read(tmp_path / "samples") == ["a", "c"] and _read(tmp_path / "errors") == ["b"]
    assert pq.read_schema(next((tmp_path / "samples").iterdir())).names == SAMPLE_SCHEMA.names
    assert pq.read_schema(next((tmp_path / "errors").iterdir())).names == ERROR_SCHEMA.names
    assert marker["seconds"] == {"captioner": pytest.approx(1.5)} and marker["retries"] == {"captioner": 1}
    assert log.committed_ids() == {"a", "b", "c"}


def test_writing_the_same_rows_again_replaces_them(tmp_path):
    log = CommitLog(str(tmp_path))
    log.commit(_rows(["a", "b"], ["", ""]))
    log.commit(_rows(["b", "a"], ["", ""]))  # a retried write task
    assert _read(tmp_path / "samples") == ["a", "b"] and len(log.markers()) == 1


def test_recover_undoes_parts_that_never_committed(tmp_path):
    log = CommitLog(str(tmp_path))
    log.commit(_rows(["a"], [""]))
    marker = log.commit(_rows(["b"], [""]))
    # Crash after the staged file was written, before the marker: move the file back, drop the marker.
    (tmp_path / "samples" / f"{marker['name']}.parquet").rename(
        tmp_path / "_staging" / "samples" / marker["staged"]["samples"])
    (tmp_path / "_commits" / f"{marker['name']}.json").rename(tmp_path / "_commits" / f".{marker['name']}.json.tmp")
    assert log.recover() == {"committed_parts": 1, "orphans_removed": 2, "parts_dropped": 0}
    assert _read(tmp_path / "samples") == ["a"] and log.committed_ids() == {"a"}
    assert not list((tmp_path / "_staging" / "samples").iterdir())


def test_recover_finishes_parts_that_committed(tmp_path):
    log = CommitLog(str(tmp_path))
    marker = log.commit(_rows(["a", "b"], ["", "corrupt image: x"]))
    # Crash after the marker, before the files moved into place.
    for folder in ("samples", "errors"):
        (tmp_path / folder / f"{marker['name']}.parquet").rename(
            tmp_path / "_staging" / folder / marker["staged"][folder])
    assert _read(tmp_path / "samples") == []  # readers never see staged data
    log.recover()
    assert _read(tmp_path / "samples") == ["a"] and _read(tmp_path / "errors") == ["b"]


def test_all_error_batches_write_no_sample_file(tmp_path):
    CommitLog(str(tmp_path)).commit(_rows(["a", "b"], ["empty file: 0 bytes", "not an image: x"]))
    assert not (tmp_path / "samples").exists() and _read(tmp_path / "errors") == ["a", "b"]


def test_a_writer_of_a_run_that_was_taken_over_cannot_commit(tmp_path):
    """A killed driver's tasks still in flight must not commit into the run that resumed it."""
    old = CommitLog(str(tmp_path))
    old.take_over(grace_s=0)
    old.commit(_rows(["a"], [""]))
    new = CommitLog(str(tmp_path))
    new.take_over(grace_s=0)
    with pytest.raises(Superseded, match="another run"):
        old.commit(_rows(["b"], [""]))  # b is still pending for the new run: it must not land twice
    assert new.committed_ids() == {"a"} and _read(tmp_path / "samples") == ["a"]
    # The straggler took its staged file back: the new owner recovered before it wrote, and
    # would otherwise finish with a stray file in its folder.
    assert not list((tmp_path / "_staging" / "samples").iterdir())
    assert new.recover()["orphans_removed"] == 0
    new.commit(_rows(["b"], [""]))
    assert _read(tmp_path / "samples") == ["a", "b"]


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
    assert json.loads((tmp_path / "_owner.json").read_text()) == {"token": token}
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


def test_uncommitted_parts_become_pending_and_a_cut_short_removal_is_finished(tmp_path):
    log = CommitLog(str(tmp_path))
    log.commit(_rows(["a", "b"], ["", ""]))
    failed = log.commit(_rows(["c"], ["stage failed: inpainter worker died on this batch 3 times"]))
    assert log.uncommit(lambda m: m["error_kinds"] == ["stage failed"]) == ["c"]
    assert log.committed_ids() == {"a", "b"} and _read(tmp_path / "errors") == []
    # Removal cut short after the data went, before the marker: recovery drops the marker.
    again = log.commit(_rows(["c"], ["stage failed: again"]))
    assert again["name"] == failed["name"]
    (tmp_path / "errors" / f"{again['name']}.parquet").unlink()
    assert log.recover()["parts_dropped"] == 1 and log.committed_ids() == {"a", "b"}
    assert _read(tmp_path / "samples") == ["a", "b"]


def test_recover_keeps_one_part_per_id_and_frees_the_rest(tmp_path):
    """Two parts holding one id (a straggler that outlived the owner check): the part with
    samples stays, the other goes, and its ids found nowhere else are pending again."""
    log = CommitLog(str(tmp_path))
    log.commit(_rows(["a", "b"], ["", ""]))
    log.commit(_rows(["b", "c"], ["stage failed: x", "stage failed: x"]))
    assert log.recover()["parts_dropped"] == 1
    assert log.committed_ids() == {"a", "b"}  # c is to be redone
    assert _read(tmp_path / "samples") == ["a", "b"] and _read(tmp_path / "errors") == []
