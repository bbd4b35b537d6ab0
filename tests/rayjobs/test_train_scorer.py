"""The scorer job on 2 CPU workers (gloo) with DeepSpeed ZeRO."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import end_actors_of_dead_drivers, print_figures, write_samples
from PIL import Image

from blipinpaint.config import heldout_fraction, load_config
from blipinpaint.scorer import TARGETS, ScoreNet, ScoreNetConfig
from blipinpaint.seeds import heldout
from rayjobs import train_scorer, training


def test_scorer_learns_a_learnable_signal(local_ray, tmp_path):
    """At ZeRO-3 with the optimizer state offloaded to CPU memory (DeepSpeed refused a torch
    optimizer there), on 3 workers of a quarter CPU each, with a layer large enough (120k
    weights) that ZeRO-3 splits it over the ranks: the saved model must hold it whole. (The
    default, ZeRO-2 on 2 workers, trains in the main run and the resume tests.) Eight rows
    have an infinite PSNR: they are left out, counted, and poison nothing."""
    zero_stage, offload, workers, hidden, cpus = 3, True, 3, "[400,300]", 0.25
    restored = range(0, 400, 50)
    write_samples(tmp_path, restored_exactly=restored)
    cfg = load_config(overrides=[f"run_dir={tmp_path}", f"train.zero_stage={zero_stage}", "scorer.epochs=6",
                                 f"train.offload_optimizer={str(offload).lower()}", f"train.num_workers={workers}",
                                 f"train.cpus_per_worker={cpus}",
                                 "train.tensorboard=true",
                                 "scorer.lr=1e-2", "scorer.batch_size=96", "finetune.batch_size=3",
                                 f"scorer.hidden={hidden}"])
    report = train_scorer.run(cfg)
    out = tmp_path / "scorer"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(6))
    assert records[-1]["engine"] == {"zero_stage": zero_stage, "offload_optimizer": offload, "dtype": "float32",
                                     "workers": workers, "cpus_per_worker": cpus, "global_batch": 96,
                                     "batch_per_worker": 32, "controller_poll_s": training.CONTROLLER_POLL_S}
    assert records[-1]["val_loss"] < 0.5 * records[-1]["val_loss_mean_baseline"]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    for name, r in report["heldout"].items():
        assert r["mae"] < r["mae_mean_baseline"] and r["r2"] > 0.3, name
    model = ScoreNet.from_pretrained(out / "model")
    assert model.config.in_features == 16
    # Standardised by the whole training split's statistics, gathered from every rank (the
    # equal shares may leave out up to 2 rows; one rank's own would be ~0.1 spread off).
    fraction = heldout_fraction(cfg, [f"img{i:04d}" for i in range(400)])
    rows = pq.read_table(tmp_path / "generate" / "samples").to_pylist()
    infinite = {f"img{i:04d}" for i in restored}
    held = {r["id"] for r in rows if heldout(cfg.seed, r["id"], fraction)}
    assert report["non_finite_left_out"] == {"train": len(infinite - held), "heldout": len(infinite & held)}
    assert 0 < len(infinite & held) < len(infinite)  # both splits hold some
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in records)
    train_targets = np.array([[r[t] for t in TARGETS] for r in rows if r["id"] not in held | infinite])
    spread = train_targets.std(0, ddof=1)
    # The batch of 96 is per optimizer step, over the 3 workers: each takes 32 of its share per
    # step, the shares equal (cut to the smallest once the infinite rows are out).
    train_ids = sorted(r["id"] for r in rows if r["id"] not in held)
    shares = train_ids[:len(train_ids) - len(train_ids) % workers]
    per_rank = [len([i for i in shares[k * len(shares) // workers:(k + 1) * len(shares) // workers]
                     if i not in infinite]) for k in range(workers)]
    assert records[-1]["step"] == 6 * math.ceil(min(per_rank) / 32)
    assert (np.abs(np.array(model.config.mean) - train_targets.mean(0)) < 0.02 * spread).all()
    assert (np.abs(np.array(model.config.std) / spread - 1) < 0.02).all()
    for png in ("loss.png", "scatter.png"):
        assert Image.open(out / png).size[0] > 100
    assert list((out / "tensorboard").glob("events.out.tfevents*"))
    # No step skipped; fp32 runs no loss scaling, so there is no scale to report.
    assert all(r["skipped_steps"] == 0 and r["loss_scale"] is None for r in records)
    assert (report["steps"], report["skipped_steps"], report["loss_scale"]) == (records[-1]["step"], 0, None)


def test_each_rank_reads_its_own_run_of_the_rows():
    """Training shares are equal and disjoint (the last rows left over); held-out shares cover
    every row; a rank names only the parts that hold its rows."""
    reads = [{"path": "p0", "ids": ["a", "b", "c"]}, {"path": "p1", "ids": ["d", "e"]}, {"path": "p2", "ids": ["f"]}]

    def rows(batch):
        return [(path, i) for path, ids in zip(batch["path"], batch["ids"]) for i in ids]

    train = [train_scorer.share(reads, rank, 4, equal=True) for rank in range(4)]
    assert [rows(b) for b in train] == [[("p0", "a")], [("p0", "b")], [("p0", "c")], [("p1", "d")]]
    val = [rows(train_scorer.share(reads, rank, 4, equal=False)) for rank in range(4)]
    assert sorted(r for share in val for r in share) == rows({"path": ["p0", "p1", "p2"],
                                                           "ids": [["a", "b", "c"], ["d", "e"], ["f"]]})
    assert [len(share) for share in val] == [1, 2, 1, 2]
    assert train_scorer.share(reads, 1, 2, equal=False) == {"path": ["p1", "p2"], "ids": [["d", "e"], ["f"]]}
    assert train_scorer.share(reads[2:], 1, 2, equal=True) == {"path": [], "ids": []}


def test_a_constant_target_is_centred_not_divided_by_zero():
    """Random CLIP models score every training row 0 (the clamp): that target keeps scale 1."""
    mean, std = train_scorer.target_stats(torch.tensor([[0.5, 20.0, 0.0], [0.7, 22.0, 0.0]]))
    assert mean == pytest.approx([0.6, 21.0, 0.0])
    assert std == pytest.approx([0.1414, 1.4142, 1.0], rel=1e-3)


def test_too_few_held_out_rows_give_a_report_that_says_why(tmp_path, capsys):
    """A handful of inputs may hash one held-out row or none: the report says why the held-out
    figures are missing instead of the job crashing after training (R² needs two rows)."""
    ScoreNet(ScoreNetConfig(in_features=4, hidden=(8,))).save_pretrained(tmp_path / "model")
    row = {"id": "a", "caption_features": [1.0] * 4, "ssim": 0.5, "psnr": 20.0, "clip_score": 10.0}

    def reads(rows):  # the read tasks of one committed part holding `rows`
        path = tmp_path / f"part-{len(rows)}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return [{"path": str(path), "ids": [r["id"] for r in rows]}] if rows else []

    restored = {**row, "id": "c", "psnr": float("inf")}  # a row with an infinite target does not count
    for rows in ([], [row], [row, restored]):
        heldout_ = train_scorer.evaluate(str(tmp_path / "model"), reads(rows), str(tmp_path))
        assert heldout_ == {"missing": f"{min(len(rows), 1)} held-out samples with finite targets: R² needs at "
                                       "least 2 (more inputs, or a larger train.val_fraction)"}
    two = train_scorer.evaluate(str(tmp_path / "model"), reads([row, {**row, "id": "b", "ssim": 0.7}]), str(tmp_path))
    assert set(two) == {"ssim", "psnr", "clip_score"}
    assert train_scorer.evaluate(str(tmp_path / "model"), reads([row, {**row, "id": "b", "ssim": 0.7}]),
                                 str(tmp_path), limit=1) == heldout_  # the limit reads one row
    train_scorer.print_report({"epochs": 1, "final": {"train_loss": 1.0, "val_loss": None}, "heldout": heldout_})
    assert "no held-out figures: 1 held-out samples" in capsys.readouterr().out


def test_the_same_command_again_takes_the_run_over_and_continues_from_its_checkpoint(local_ray, tmp_path):
    """A training driver still running (or killed, its ranks alive) when the command runs
    again: the new run takes the folder over and continues from the last checkpoint; the old
    run's ranks stop at their next epoch instead of writing into the new run's log and
    checkpoints, and its driver says why."""
    write_samples(tmp_path)
    args = [f"run_dir={tmp_path}", "scorer.epochs=6", "scorer.batch_size=64", "scorer.hidden=[16]",
            "scorer.checkpoint_every=1"]
    old = subprocess.Popen(
        [sys.executable, "-m", "rayjobs.train_scorer", *args,
         f"ray_address={local_ray.get_runtime_context().gcs_address}"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy(), text=True)
    started = time.perf_counter()
    try:
        log = tmp_path / "scorer" / "metrics.jsonl"
        deadline = time.time() + 300
        # Epoch k's line is logged before its report, which waits until report k-1 was collected:
        # at 3 lines the checkpoint of epoch 0 is registered.
        while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
            assert old.poll() is None, old.stderr.read()
            time.sleep(0.2)
        done = len(log.read_text().splitlines())
        train_scorer.run(load_config(overrides=args))
        _, err = old.communicate(timeout=120)
    finally:
        if old.poll() is None:
            os.killpg(old.pid, signal.SIGKILL)
            old.wait()
        end_actors_of_dead_drivers(local_ray, old.pid)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    print_figures("training taken over by the same command", {
        "epochs": len(records), "epochs_logged_before": done, "resumed_at_epoch": records[-1]["resumed_at_epoch"],
        "optimizer_steps": records[-1]["step"], "uninterrupted_steps": 6 * records[0]["step"]},
        time.perf_counter() - started)
    assert old.returncode == 1
    assert f"train_scorer: {tmp_path}/scorer is now written by another run; this run's writes stop here" in err
    # Each epoch logged once: the old run's up to the checkpoint, the new run's after it.
    assert [r["epoch"] for r in records] == list(range(6))
    resumed = records[-1]["resumed_at_epoch"]
    assert resumed is not None and resumed >= 1
    assert [r["resumed_at_epoch"] for r in records] == [None] * resumed + [resumed] * (6 - resumed)
    assert records[-1]["step"] == 6 * records[0]["step"]  # the optimizer steps of an uninterrupted run
    owner = json.loads((tmp_path / "scorer" / "_owner.json").read_text())
    released = json.loads((tmp_path / "scorer" / "_released.json").read_text())
    assert released["token"] == owner["token"]  # the new run finished


def test_used_up_restarts_end_the_job_with_one_line_and_the_same_command_continues(local_ray, tmp_path, capsys):
    """Rank 0's process dies in epoch 1 with no restart allowed: the job ends with one line.
    The same command again continues from epoch 0's checkpoint and ends with the optimizer
    steps of an uninterrupted run (a start from scratch would die again). The worker group's
    own restart after a death: test_finetune_blip, through the same `rayjobs.training` code."""
    write_samples(tmp_path)
    args = [f"run_dir={tmp_path}", "scorer.epochs=3", "scorer.batch_size=64", "scorer.hidden=[16]",
            "scorer.checkpoint_every=1", "train.max_failures=0", "train.inject_failure_at_step=6"]
    started = time.perf_counter()
    code = train_scorer.main(args)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train_scorer: ")]
    assert code == 1
    assert len(said) == 1 and said[0].startswith("train_scorer: training failed (train.max_failures=0 restarts "
                                                 "allowed); the error on rank 0: "), said
    log = tmp_path / "scorer" / "metrics.jsonl"
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [0]

    assert train_scorer.main(args) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps_per_epoch = records[0]["step"]  # epoch 0 ran uninterrupted
    print_figures("Ray Train worker killed mid-epoch, no restart allowed; the same command again", {
        "epochs": len(records), "died_at_step": 6, "resumed_at_epoch": records[-1]["resumed_at_epoch"],
        "optimizer_steps": records[-1]["step"], "uninterrupted_steps": 3 * steps_per_epoch},
        time.perf_counter() - started)
    assert [r["epoch"] for r in records] == [0, 1, 2]  # the redone epoch is logged once
    assert [r["resumed_at_epoch"] for r in records] == [None, 1, 1]  # the second run loaded epoch 0
    assert steps_per_epoch < 6 < 2 * steps_per_epoch  # ~300 training rows / 2 workers / 32 each: dies mid epoch 1
    assert records[-1]["step"] == 3 * steps_per_epoch


def test_a_training_whose_steps_were_all_skipped_is_an_error_not_a_scorer(local_ray, tmp_path, capsys):
    """Caption features holding NaN make every gradient NaN: DeepSpeed drops each such step (as
    it drops an fp16 overflow) but still counts it in `global_steps`. The job says so in one
    line, and the folder is not marked done (no report, no `_SUCCESS`) for the next step."""
    write_samples(tmp_path, n=64)
    part = tmp_path / "generate" / "samples" / "part-0.parquet"
    table = pq.read_table(part)
    nan = [np.full(16, np.nan, np.float32)] * len(table)
    pq.write_table(table.set_column(table.schema.get_field_index("caption_features"), "caption_features",
                                    pa.array(nan, type=table.schema.field("caption_features").type)), part)
    code = train_scorer.main([f"run_dir={tmp_path}", "scorer.epochs=2", "scorer.batch_size=16", "scorer.hidden=[8]",
                              "scorer.checkpoint_every=2"])
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train_scorer: ")]
    records = [json.loads(line) for line in (tmp_path / "scorer" / "metrics.jsonl").read_text().splitlines()]
    steps = records[-1]["step"]
    assert code == 1 and steps > 0
    assert [(r["skipped_steps"], r["loss_scale"]) for r in records] == [(steps // 2, None), (steps, None)]
    assert said == [f"train_scorer: DeepSpeed skipped all {steps} optimizer steps (an inf or NaN gradient at every "
                    f"step): nothing was trained, the output is not marked done; each epoch's skipped_steps and "
                    f"loss_scale are in {tmp_path}/scorer/metrics.jsonl"]
    assert not (tmp_path / "scorer" / "_SUCCESS").exists() and not (tmp_path / "scorer" / "report.json").exists()
