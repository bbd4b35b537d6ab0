"""A run's end over the commit log in Arrow: the account, the stats' means, the training
split's reads and `uncommit` hold the ids as Arrow arrays, never whole markers (a Python
list per part, a Python string per id), and say the same as the per-id readers did."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import sample_rows as _rows

from blipinpaint.commit_log import CommitLog
from blipinpaint.commits import NAMED, stage_failure
from blipinpaint.config import heldout_fraction, load_config
from blipinpaint.errors import JobError
from blipinpaint.log_table import LogView
from blipinpaint.reader import read_errors, row_reads, split_reads
from blipinpaint.seeds import heldout, scores_below
from rayjobs import generate


def _no_whole_markers(monkeypatch):
    def whole(self):
        raise AssertionError("whole markers made: a Python object per id")

    monkeypatch.setattr(LogView, "markers", whole)


def _log(path, compact=True) -> CommitLog:
    """Samples s00-s11 in three parts (s04-s07 with metric values of their own, one of them
    infinite), errors e0-e1 in a fourth, a `stage failed` part (f0, f1) loose after the
    checkpoint."""
    log = CommitLog(str(path), compact_every=0)
    log.commit(_rows([f"s{i:02d}" for i in range(4)], [""] * 4))
    odd = _rows([f"s{i:02d}" for i in range(4, 8)], [""] * 4)
    odd = odd.set_column(odd.schema.get_field_index("psnr"), "psnr",
                         pa.array([2.0, 4.0, float("inf"), 6.0], pa.float32()))
    log.commit(odd)
    log.commit(_rows([f"s{i:02d}" for i in range(8, 12)], [""] * 4))
    log.commit(_rows(["e0", "e1"], ["not an image: x", "too small: y"]))
    if compact:
        log.compact()
    log.commit(_rows(["f0", "f1"], ["stage failed: inpainter raised"] * 2))
    return log


def test_the_account_and_the_means_are_arrow_and_read_only_the_listed_samples(tmp_path, monkeypatch):
    _log(tmp_path)
    _no_whole_markers(monkeypatch)
    listed = pa.array([f"s{i:02d}" for i in range(2, 12)] + ["e0", "new"], pa.string())
    account = CommitLog(str(tmp_path)).account(listed)
    assert isinstance(account.ok_ids, pa.Array) and isinstance(account.missing_ids, pa.Array)
    assert sorted(account.ok_ids.to_pylist()) == [f"s{i:02d}" for i in range(2, 12)]
    assert account.missing_ids.to_pylist() == ["new"] and dict(account.errors_by_reason) == {"not an image": 1}
    stats = generate.summarize(str(tmp_path), account, {})
    assert (stats["inputs"], stats["ok"], stats["errors"], stats["missing"]) == (12, 10, 1, 1)
    # s00-s01 are not listed: their 1.0s do not count; the infinite PSNR does not either.
    psnr = [1.0, 1.0, 2.0, 4.0, 6.0] + [1.0] * 4
    assert stats["means"]["psnr"] == pytest.approx(sum(psnr) / len(psnr), rel=1e-12)
    # Parts read a block at a time: the same means.
    assert generate.metric_means(str(tmp_path), account, block=1) == stats["means"]


def test_the_means_count_no_row_of_an_id_outside_its_accounted_part(tmp_path):
    """A stray sample file (not a part the log accounts for) holding a listed id adds nothing."""
    _log(tmp_path, compact=False)
    stray = _rows(["s04"], [""])
    stray = stray.set_column(stray.schema.get_field_index("psnr"), "psnr", pa.array([1000.0], pa.float32()))
    pq.write_table(stray.select(["id", "psnr"]), tmp_path / "samples" / "part-stray.parquet")
    account = CommitLog(str(tmp_path)).account([f"s{i:02d}" for i in range(4, 8)])
    assert generate.metric_means(str(tmp_path), account)["psnr"] == pytest.approx(4.0)


def test_a_missing_id_count_is_whole_but_the_ids_named_are_bounded(tmp_path):
    log = _log(tmp_path)
    listed = pa.array([f"x{i:05d}" for i in range(2000)] + ["s00"], pa.string())
    with pytest.raises(JobError) as err:
        log.account(listed).check(str(tmp_path), "inputs")
    message = str(err.value)
    assert "2000 inputs missing, 0 duplicated; run the same command again to finish" in message
    named = [f"x{i:05d}" for i in range(2000) if f"x{i:05d}" in message]
    assert named == [f"x{i:05d}" for i in range(NAMED)] and message.endswith(", ...")


def test_a_duplicated_id_is_named(tmp_path):
    log = _log(tmp_path)
    log.commit(_rows(["s03", "z"], ["", ""]))  # s03 in a second part
    with pytest.raises(JobError, match=r"0 inputs missing, 1 duplicated; .*; duplicated: s03$"):
        log.account(["s03", "z"]).check(str(tmp_path), "inputs")


def test_uncommit_of_failed_stages_reads_the_id_table_and_the_split_reads_arrow(tmp_path, monkeypatch):
    log = _log(tmp_path)
    _no_whole_markers(monkeypatch)
    undone = log.uncommit(stage_failure)
    assert isinstance(undone, pa.Array) and sorted(undone.to_pylist()) == ["f0", "f1"]
    assert sorted(CommitLog(str(tmp_path)).committed_id_array().to_pylist()) == \
        sorted([f"s{i:02d}" for i in range(12)] + ["e0", "e1"])
    samples = CommitLog(str(tmp_path)).committed_samples()
    assert isinstance(samples, pa.Table) and samples.num_rows == 12 and samples.column("part").to_pylist() == \
        sorted(samples.column("part").to_pylist())
    reads = row_reads(str(tmp_path), pa.array(["s11", "s01", "s00", "e0", "nowhere"]), samples)
    assert [r["ids"] for r in reads] == sorted([["s00", "s01"], ["s11"]])
    cfg = load_config(overrides=[f"run_dir={tmp_path.parent}", f"data.source={tmp_path}", "seed=3"])
    (tmp_path.parent / "generate").symlink_to(tmp_path)
    train, held = split_reads(cfg)
    ids = [f"s{i:02d}" for i in range(12)]
    fraction = heldout_fraction(cfg, ids)  # the split as every job makes it, an id at a time
    assert sorted(i for r in held for i in r["ids"]) == [i for i in ids if heldout(3, i, fraction)]
    assert sorted(i for r in train for i in r["ids"]) == [i for i in ids if not heldout(3, i, fraction)]


def test_the_split_bound_is_exact_where_a_float_is_not():
    """`heldout` compares a 63-bit integer with a float; the array form compares integers."""
    fraction = 0.3
    bound = math.ceil(fraction * 2**63)
    scores = np.array([bound - 1, bound, bound + 1, 2**61], np.uint64)
    expected = [int(s) < fraction * 2**63 for s in scores]
    assert scores_below(scores, fraction).tolist() == expected == [True, False, False, True]
    # float64 would have said otherwise for one of them: the exactness is the point
    assert (scores.astype(np.float64) < fraction * 2**63).tolist() != expected


def test_an_id_listed_twice_counts_once_and_found_ids_are_not_missing(tmp_path):
    log = _log(tmp_path)
    account = log.account(pa.array(["s00", "s00", "s01", "e0"], pa.string()))
    assert (account.listed, len(account.ok_ids), account.errors, account.missing) == (3, 2, 1, [])
    assert account.complete and log.account(pa.array([], pa.string())).listed == 0


def test_the_error_rows_read_the_id_table_and_only_the_parts_they_return(tmp_path, monkeypatch):
    _log(tmp_path)
    _no_whole_markers(monkeypatch)
    rows, total = read_errors(str(tmp_path), limit=3)
    assert total == 4 and len(rows) == 3  # e0, e1, f0, f1 committed; the first 3 in part-name order
    assert {r["id"] for r in rows} < {"e0", "e1", "f0", "f1"} and all(r["reason"] for r in rows)
    rows, total = read_errors(str(tmp_path), {"e1", "s00"})
    assert total == 1 and [(r["id"], r["reason"]) for r in rows] == [("e1", "too small: y")]


def test_the_run_end_bench_builds_a_log_and_measures_its_steps(tmp_path, monkeypatch, capsys):
    """`bench/run_end.py` at 3 parts: what BENCHMARKS.md's run's-end figures ran."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("run_end", Path(__file__).parents[1] / "bench" / "run_end.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = []
    for step in ("build", "summarize", "split", "account"):
        monkeypatch.setattr(sys, "argv", ["run_end.py", str(tmp_path), step, "--parts", "3"])
        bench.main()
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["compacted"]["parts"] == 3
    assert (results[1]["listed"], results[1]["ok"], results[1]["errors"]) == (768, 384, 384)
    assert results[1]["means"]["psnr"] == pytest.approx(sum(j % 7 for j in range(128)) / 128)
    assert results[2]["train_reads"] == 3 and results[3]["peak_rss_mb"] >= results[3]["imports_rss_mb"]


@pytest.mark.parametrize("retry", [False, True])
def test_the_plan_counts_the_failed_stages_a_retry_redoes_from_the_id_table(tmp_path, monkeypatch, retry):
    from blipinpaint import plan

    _log(tmp_path / "run" / "generate")  # s00-s11, e0-e1 committed; f0, f1 a `stage failed` part
    _no_whole_markers(monkeypatch)
    cfg = load_config(overrides=[f"run_dir={tmp_path / 'run'}", f"data.source={tmp_path}", "dry_run=true",
                                 f"stream.retry_failed={str(retry).lower()}"])
    pages = [[{"id": i} for i in ("s00", "s01", "f0")], [{"id": i} for i in ("f1", "e0", "new")]]
    result = plan.plan(cfg, pages)
    assert (result["inputs"], result["committed_samples"], result["committed_errors"]) == (6, 2, 3)
    assert result["to_do"] == (3 if retry else 1) and result["made_by"]["commit_log"]["parts"] == 5


def test_a_sample_committed_twice_counts_once_in_ok(tmp_path):
    log = _log(tmp_path)
    log.commit(_rows(["s03", "z"], ["", ""]))  # s03 in a second part, as a sample again
    account = log.account(["s03", "z"])
    assert (account.ok_count, len(account.ok_ids), account.ok, account.duplicates) == (2, 3, {"s03", "z"}, 1)
    assert generate.summarize(str(tmp_path), account, {})["ok"] == 2
