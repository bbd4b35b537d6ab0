"""Compactions of the commit log racing one another or a new run (`blipinpaint.checkpoints`):
two writers' folds of one `seq`, and a fold of a run taken over, interleaved step by step
(RELIABILITY.md, "The commit log's checkpoints")."""

from __future__ import annotations

import itertools
import posixpath
import shutil
import time

import pytest
from helpers import sample_rows as _rows
from pyarrow import fs as pafs

from blipinpaint import checkpoints
from blipinpaint.checkpoints import CHECKPOINTS, checkpoint_name
from blipinpaint.commit_log import CommitLog
from blipinpaint.storage import filesystem


def _files(uri: str, folder: str) -> list[str]:
    fs, root = filesystem(uri)
    selector = pafs.FileSelector(posixpath.join(root, folder), allow_not_found=True)
    return sorted(i.base_name for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)


def _commit_parts(log: CommitLog, start: int, n: int) -> list[dict]:
    """`n` parts of one row each; every seventh an error row."""
    return [log.commit(_rows([f"img{i:04d}"], ["not an image: x" if i % 7 == 0 else ""]))
            for i in range(start, start + n)]


def _sorting_last(monkeypatch, uri: str, chosen) -> None:
    """A checkpoint whose parts `chosen` picks gets a name that sorts after those of its `seq`
    present (a nonce in its metadata makes another digest): the order that a tie between
    checkpoints of one `seq` broken by their names gets wrong, half the time by chance."""
    encode = checkpoints.encode

    def encoding(info, parts, ids, placed):
        data, nonce = encode(info, parts, ids, placed), 0
        rivals = [n for n in _files(uri, CHECKPOINTS) if n.startswith(f"ckpt-{info['seq']:08d}-")]
        while chosen(parts) and any(checkpoint_name(info["seq"], data) < n for n in rivals):
            nonce += 1
            data = encode({**info, "nonce": nonce}, parts, ids, placed)
        return data

    monkeypatch.setattr(checkpoints, "encode", encoding)


@pytest.mark.parametrize("race", ["each fold read another copy", "a merge lifted the older copy"])
def test_two_writers_folds_of_one_seq_read_the_newest_copy_of_a_part(tmp_path, race, monkeypatch):
    """Two writers fold at once: both list the same checkpoints, so both write the next `seq`.
    A part committed again (a retried commit task: same ids, another marker) is held by both,
    an older copy in one and the newer in the other, when the first fold read the marker
    before the second commit and the second fold after it, or when a merge by the writer
    that did not see the other's fold lifted the older copy, from an older checkpoint, to
    that `seq`. The newer copy is read, whichever of the two names sorts last."""
    uri = str(tmp_path / "out")
    clock = itertools.count(time.time(), 1.0)  # the writers' clocks: each commit a second after the last
    monkeypatch.setattr(CommitLog, "_now", staticmethod(lambda: next(clock)))
    log = CommitLog(uri, compact_every=0)
    for start in (0, 3, 6):  # three checkpoints of three parts: seq 1 to 3
        _commit_parts(log, start, 3)
        log.fold()
    if race == "each fold read another copy":  # img0009 an error, loose: the older copy
        again = log.commit(_rows(["img0009"], ["not an image: x"]))
        first = {again["name"], *(m["name"] for m in _commit_parts(log, 10, 2))}  # what `a` folds
        second = None  # `b` folds what is loose then
    else:  # img0000's older copy is in the first checkpoint
        (again,) = [m for m in log.markers() if m["errors"] == ["img0000"]]
        first = {m["name"] for m in _commit_parts(log, 9, 3)}  # `a`'s fold: the fourth of its tier, merged
        second = {again["name"]}  # `b`'s: the newer copy alone
    (redone,) = again["errors"]
    a, b = CommitLog(uri), CommitLog(uri)

    def between(step):
        if step == "read":  # `a` listed the checkpoints and read its markers; its checkpoint is not written
            log.commit(_rows([redone], [""]))  # committed again, now a sample: the newer copy, loose
            b.fold(second)

    a._step = between
    _sorting_last(monkeypatch, uri, lambda parts: any(p["name"] == again["name"] and "errors" in p["staged"]
                                                      for p in parts))
    a.fold(first)
    monkeypatch.undo()
    seqs = [int(checkpoints.NAME.fullmatch(n).group(1)) for n in _files(uri, CHECKPOINTS)]
    assert len(seqs) == 2 and seqs[0] == seqs[1] == 4 and _files(uri, "_commits") == []

    ids = [f"img{i:04d}" for i in range(12)]
    errors = {"img0000", "img0007"} - {redone}
    shutil.copytree(uri, tmp_path / "copy")
    for then in ("as the folds left it", "the two merged by a writer", "compacted whole (a run's end)"):
        if then == "the two merged by a writer":  # one that lists both merges both (never one of a seq)
            present = _files(uri, CHECKPOINTS)
            assert CommitLog(uri)._merge(present, set(present))["checkpoints_merged"] == 2
        elif then.startswith("compacted"):  # the two, as the folds left them
            uri = str(tmp_path / "copy")
            assert CommitLog(uri).compact()["checkpoints_merged"] == 2
        reader = CommitLog(uri)
        (copy,) = [m for m in reader.markers() if m["name"] == again["name"]]
        assert (copy["samples"], copy["errors"]) == ([redone], [])
        account = reader.account(ids)
        assert (len(account.ok), account.errors, account.missing, account.duplicates) == (12 - len(errors),
                                                                                          len(errors), [], 0)
        assert CommitLog(uri).recover() == {"committed_parts": 12, "orphans_removed": 0, "parts_dropped": 0}


@pytest.mark.parametrize("writes", ["fold", "merge"])
def test_a_compaction_by_a_run_taken_over_never_brings_back_a_part_the_new_run_removed(tmp_path, writes, caplog):
    """A writer of a run checks that its run owns the folder, then folds (or merges); a new
    run takes the folder over meanwhile and removes a part (`retry_failed`: its data, then a
    checkpoint without it), after the writer found the part's files in place and before its
    checkpoint lands. That checkpoint, flagging the part `placed`, is not read: the writer
    finds the folder is no longer its run's once it is written and takes it back."""
    uri = str(tmp_path / "out")
    old = CommitLog(uri, compact_every=1)  # the run's setting: every commit folds
    old.take_over(grace_s=0)
    writer = CommitLog(uri, owner=old.owner)
    # Checkpoints of one part each (seq 1, 2, ...); with three, the fourth fold merges four.
    before = _commit_parts(writer, 1, 2 if writes == "fold" else 3)
    write, resumed = writer._write, []

    def new_run_between(info, parts, ids, placed):  # the writer found the files; its checkpoint not written
        if not resumed and (writes == "fold" or info["merged"]):
            resumed.append(CommitLog(uri).resume(retry_failed=True, grace_s=0))
        return write(info, parts, ids, placed)

    writer._write = new_run_between
    writer.commit(_rows(["d"], ["stage failed: x"]))  # a batch a preempted machine failed: `retry_failed` redoes it
    (new,) = resumed
    assert list(new.retried) == ["d"] and "d" not in new.done
    # The writer's commit stands; its compaction is taken back, logged: the removal's checkpoint is left.
    assert "taken back" in caplog.text and len(_files(uri, CHECKPOINTS)) == 1

    done = {i for m in before for i in m["samples"]}
    assert CommitLog(uri).committed_ids() == done
    assert CommitLog(uri).resume(grace_s=0).done == done  # `d` is not trusted as in place: it is not done
    account = CommitLog(uri).account(sorted(done | {"d"}))
    assert account.missing == ["d"] and account.duplicates == 0


def test_a_fold_taken_back_never_deletes_the_same_fold_of_another_writer(tmp_path):
    """Two writers of one run fold the same loose markers at once. Their checkpoints would be
    the same bytes, so one name: the first lands and deletes the markers, a new run takes the
    folder over, the second lands on the same name, finds the folder taken and takes its
    checkpoint back. Each write is its own file (a nonce): the first's stays, and every part
    it folded reads as committed."""
    uri = str(tmp_path / "out")
    old = CommitLog(uri, compact_every=0)
    old.take_over(grace_s=0)
    a, b = CommitLog(uri, owner=old.owner), CommitLog(uri, owner=old.owner)
    parts = _commit_parts(a, 0, 5)
    loose = a._names("_commits")
    folded = []

    def between(step):
        if step == "read":  # `b` read the markers; `a` folds the same ones, then a new run takes over
            folded.append(a.fold(loose)["checkpoint"])
            CommitLog(uri).take_over(grace_s=0)

    b._step = between
    with pytest.raises(checkpoints.Superseded, match="taken back"):
        b.fold(loose)
    assert _files(uri, CHECKPOINTS) == folded and _files(uri, "_commits") == []
    done = {i for m in parts for i in (*m["samples"], *m["errors"])}
    assert CommitLog(uri).committed_ids() == done and len(done) == 5
    assert CommitLog(uri).resume(grace_s=0).done == done


def test_a_part_in_a_higher_seq_wins_over_copies_tied_in_a_lower_one():
    """The tie between checkpoints of one `seq` (the copy committed last) decides among their
    copies only: a copy in a checkpoint of a higher `seq` still wins, however late the tied
    ones were committed."""
    from blipinpaint.log_table import fields, log_view, marker_rows

    def marker(ids, at):
        return {"name": "p", "samples": ids, "errors": [], "error_kinds": [], "staged": {"samples": "x"},
                "committed_at": at}

    def checkpoint(seq, m):
        return ({"format": checkpoints.FORMAT, "seq": seq, "merged": [], "unique": True, "placed": set()},
                [fields(m)], marker_rows([m]))

    sources = {"ckpt-00000004-a": checkpoint(4, marker(["late"], 300.0)),
               "ckpt-00000004-b": checkpoint(4, marker(["later"], 400.0)),
               "ckpt-00000005-c": checkpoint(5, marker(["newest seq"], 100.0))}
    view = log_view(sources, [], set(), set(), "here")
    assert view.ids.column("id").to_pylist() == ["newest seq"]
    del sources["ckpt-00000005-c"]
    assert log_view(sources, [], set(), set(), "here").ids.column("id").to_pylist() == ["later"]
