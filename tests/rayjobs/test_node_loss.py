"""Whole-node loss, as a spot preemption: the worker node running a job's work removed without
grace at a point the test waits for, a replacement added, and the job finishes by itself
(`conftest.SpotCluster`). Each job runs in a process of its own joined to that cluster, as
under `ray job submit`; what it did is read from its files. Each case prints its figures
(`FIGURES ...`), which RELIABILITY.md reports."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    PIPELINE_ARGS,
    account,
    copy_run,
    download,
    encode,
    photo,
    print_figures,
    start_job,
    wait_for,
    write_samples,
)

from blipinpaint.candidates import candidate_id
from blipinpaint.commit_log import CommitLog
from blipinpaint.config import load_config, sample_images_dir
from blipinpaint.reader import split_reads
from rayjobs import evaluate


def finish(job: subprocess.Popen, timeout_s: float = 600) -> tuple[int, str]:
    out, _ = job.communicate(timeout=timeout_s)
    if os.environ.get("NODE_LOSS_LOG"):
        with open(os.environ["NODE_LOSS_LOG"], "a") as f:
            f.write(out)
    return job.returncode, out


def fid_figures(report: dict) -> dict:
    """Every FID figure of a report (each number under a key naming FID), by its path."""
    out = {}

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, (int, float)) and "fid" in path and "replicates" not in path:
            out[path] = node

    walk({k: v for k, v in report.items() if k not in ("fingerprint", "fid_protocol", "wall_s")}, "")
    return out


def test_evaluate_survives_the_loss_of_the_node_running_its_fid_pass(main_run, spot_cluster, tmp_path):
    """The worker node removed while a FID actor holds a part (issue 35: the FID workers were
    not restartable and their shards could not be read again, so the job died with Ray's
    traceback and no report). Now the part runs again on the replacement: rc 0, every held-out
    sample evaluated once, and the report's FID figures those of the session's undisturbed run."""
    code, folder, _ = main_run
    assert code == 0
    copy_run(folder / "run", tmp_path)
    args = [*PIPELINE_ARGS, f"run_dir={tmp_path}"]  # its rows in the parts of the undisturbed run
    ids = evaluate.evaluation_ids(load_config(overrides=args))
    gate = tmp_path / "fid-gate"
    job = start_job("evaluate", [*args, "stream.inject_failure.stage=fid", f"stream.inject_failure.id={ids[-1]}",
                             f"stream.inject_failure.hold={gate}"], spot_cluster.address, tmp_path)
    started = time.perf_counter()
    wait_for(lambda: os.path.exists(f"{gate}.reached"), job, "a FID actor took the part")
    spot_cluster.lose_worker()
    gate.write_text("")  # the part's next attempt (on the replacement) goes through
    code, out = finish(job)
    assert code == 0, out[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    undisturbed = json.loads((folder / "run" / "eval" / "report.json").read_text())
    attempts = len((tmp_path / "fid-gate.reached").read_text().split())
    print_figures("evaluate, node lost in the FID pass", {"samples": report["evaluation_set"]["samples"]},
                  time.perf_counter() - started, attempts_on_the_held_part=attempts)
    assert attempts == 2  # the part was taken again after the loss, once
    assert report["evaluation_set"]["samples"] == len(ids) and report["evaluation_set"]["errors"] == 0
    assert "Traceback" not in out
    figures, expected = fid_figures(report), fid_figures(undisturbed)
    assert figures and figures.keys() == expected.keys()
    for key, value in expected.items():
        assert figures[key] == pytest.approx(value, rel=1e-9, abs=1e-15), key


def pool_lines(said: str, pool: str) -> list[str]:
    """What the job said of `pool` (`progress.PoolWatch`): a line when it lost actors, one when they are all back."""
    return [line for line in said.splitlines() if line.startswith(f"{pool} pool: ")]


def assert_the_pool_came_back(said: str, pool: str) -> None:
    """`pool` said it lost its actors, then that it had them all again: a line each, no flood."""
    lines = pool_lines(said, pool)
    assert len(lines) >= 2 and re.fullmatch(rf"{pool} pool: \d+ of \d+ actors up, \d+ restarting \(their worker or "
                                            r"node died\)", lines[0]), said[-3000:]
    assert re.fullmatch(rf"{pool} pool: (\d+) of \1 actors up again", lines[-1]), said[-3000:]
    assert len(lines) <= 4, said[-3000:]


def lose_the_node_holding(job: subprocess.Popen, out: str, gate, cluster) -> int:
    """Once a part is committed and a pool's actor holds the batch at `gate` (with work in
    every pool still to do), the worker node lost, a replacement added and the held batch let
    through; returns the ids committed before the loss."""
    wait_for(lambda: CommitLog(out).markers(), job, "the first commit")
    wait_for(lambda: os.path.exists(f"{gate}.reached"), job, "an inpainter took the held batch")
    before = len(CommitLog(out).committed_ids())
    cluster.lose_worker()
    gate.write_text("")  # its next attempt, on the replacement, goes through
    return before


def assert_the_loss_was_counted(stats: dict, said: str) -> None:
    """stats.json counts the batch held on the lost node as run again for that cause, and the
    inpainter pool's restarts (none for a stage raising or a worker dying alone); the job
    said the pool shrank and grew back."""
    assert stats["reruns"]["inpainter"]["node_lost"] >= 1  # the held batch, at least
    assert {cause for s in stats["reruns"].values() for cause, n in s.items() if n} <= {"node_lost", "output_lost"}
    restarts = stats["this_run"]["restarts"]
    assert restarts["inpainter"]["node_lost"] >= 1 and "worker_died" not in restarts["inpainter"]
    assert stats["retries"] == sum(s["node_lost"] for s in stats["reruns"].values())  # no stage raised
    assert_the_pool_came_back(said, "inpainter")


def test_generate_survives_the_loss_of_its_node_with_its_run_in_a_bucket(spot_cluster, tmp_path, s3):
    """Generate, `run_dir` in a bucket: the worker node removed once a part is committed and
    an inpainter holds the last input's batch. Its pools start again on the replacement and
    the job finishes: rc 0, every input exactly once (samples and errors read back from the
    bucket, no orphan files); it said the inpainter pool shrank and came back, and stats.json
    counts the lost node's restarts and the batches it took along."""
    import shutil

    source = tmp_path / "photos"
    source.mkdir()
    for path in sample_images_dir().iterdir():
        if path.suffix in (".jpg", ".png"):
            shutil.copy(path, source / path.name)
    for seed in (1, 2):
        (source / f"made-{seed}.png").write_bytes(encode(photo(120, 90, seed=seed), "PNG"))
    inputs = sorted(p.name for p in source.iterdir())
    out = f"{s3('node-loss')}/run/generate"
    gate = tmp_path / "inpainter-gate"
    # One row at a time through every stage: commits land while later rows are still in the pools.
    args = [f"run_dir={out.rsplit('/', 1)[0]}", f"data.source={source}", "stream.rows_per_file=1",
            "stream.read.batch_size=1", "stream.captioner.batch_size=1", "stream.inpainter.batch_size=1",
            "stream.metrics.batch_size=1", "stream.inject_failure.stage=inpainter",
            f"stream.inject_failure.id={inputs[-1]}", f"stream.inject_failure.hold={gate}"]
    job = start_job("generate", args, spot_cluster.address, tmp_path)
    started = time.perf_counter()
    before = lose_the_node_holding(job, out, gate, spot_cluster)
    code, said = finish(job)
    figures = account(out, inputs)
    stats = json.loads((Path(download(out)) / "stats.json").read_text())
    print_figures("generate, node lost after its first commit (S3)", figures, time.perf_counter() - started,
                  committed_before=before, reruns=stats["reruns"], restarts=stats["this_run"]["restarts"])
    assert code == 0, said[-3000:]
    assert before < len(inputs)  # the loss came mid-run
    assert (figures["committed"], figures["lost"], figures["duplicated"], figures["orphans"]) == (len(inputs), 0, 0, 0)
    assert "Traceback" not in said
    assert_the_loss_was_counted(stats, said)


def test_candidates_survive_the_loss_of_their_node(main_run, spot_cluster, tmp_path):
    """The candidates of the main run's training images (2 each, a row at a time): the worker
    node removed once a candidate is committed and an inpainter holds the last one. The job
    finishes by itself: rc 0, every candidate exactly once, and the loss said and counted
    as generate's is."""
    copy_run(main_run[1] / "run", tmp_path, ("generate",))
    train, _ = split_reads(load_config(overrides=[f"run_dir={tmp_path}"]))
    ids = [candidate_id(i, k) for i in sorted(i for r in train for i in r["ids"]) for k in range(2)]
    out, gate = tmp_path / "candidates", tmp_path / "inpainter-gate"
    args = [f"run_dir={tmp_path}", "caption.candidates=2", "stream.rows_per_file=1", "stream.read.batch_size=1",
            "stream.captioner.batch_size=1", "stream.inpainter.batch_size=1", "stream.metrics.batch_size=1",
            "stream.inject_failure.stage=inpainter", f"stream.inject_failure.id={ids[-1]}",
            f"stream.inject_failure.hold={gate}"]
    job = start_job("candidates", args, spot_cluster.address, tmp_path)
    started = time.perf_counter()
    before = lose_the_node_holding(job, str(out), gate, spot_cluster)
    code, said = finish(job)
    figures = account(out, ids)
    stats = json.loads((out / "stats.json").read_text())
    print_figures("candidates, node lost after their first commit", figures, time.perf_counter() - started,
                  committed_before=before, reruns=stats["reruns"], restarts=stats["this_run"]["restarts"])
    assert code == 0, said[-3000:]
    assert before < len(ids)
    assert (figures["committed"], figures["lost"], figures["duplicated"], figures["orphans"]) == (len(ids), 0, 0, 0)
    assert "Traceback" not in said
    assert_the_loss_was_counted(stats, said)


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_scorer_training_survives_the_loss_of_its_node_and_resumes_from_its_checkpoint(spot_cluster, tmp_path):
    """The scorer's two Ray Train workers lost with their node after epoch 1's checkpoint
    was registered: the run restarts on the replacement from that checkpoint (the log says
    where) and logs every epoch once, with the optimizer steps of an undisturbed run."""
    write_samples(tmp_path)
    epochs = 6
    job = start_job("train_scorer", [f"run_dir={tmp_path}", f"scorer.epochs={epochs}", "scorer.batch_size=64",
                                 "scorer.hidden=[16]", "scorer.checkpoint_every=1"], spot_cluster.address, tmp_path)
    log = tmp_path / "scorer" / "metrics.jsonl"
    started = time.perf_counter()
    # Epoch k's line is logged before its report, which waits until report k-1 was collected:
    # at 3 lines a checkpoint is registered.
    wait_for(lambda: len(read_log(log)) >= 3, job, "three epochs logged")
    before = len(read_log(log))
    spot_cluster.lose_worker()
    code, said = finish(job)
    records = read_log(log)
    print_figures("train_scorer, node lost after its third epoch", {"epochs": len(records)},
                  time.perf_counter() - started, epochs_logged_before=before,
                  resumed_at_epoch=records[-1]["resumed_at_epoch"])
    assert code == 0, said[-3000:]
    assert before < epochs
    assert [r["epoch"] for r in records] == list(range(epochs))  # every epoch, once
    resumed = records[-1]["resumed_at_epoch"]
    assert resumed is not None and 1 <= resumed <= before
    assert records[-1]["step"] == epochs * records[0]["step"]


def test_fine_tuning_survives_the_loss_of_its_node_and_resumes_from_its_checkpoint(main_run, spot_cluster,
                                                                                    tmp_path):
    """The fine-tune's workers lost with their node once its third epoch was logged (the
    first one's checkpoint registered): it resumes from a checkpoint on the replacement, logs
    every epoch and optimizer step once and publishes the decoder."""
    copy_run(main_run[1] / "run", tmp_path, ("generate", "scorer"))
    epochs = 6  # an epoch is a step and a probe here: the loss must land with epochs still to do
    args = [*PIPELINE_ARGS, f"run_dir={tmp_path}", f"finetune.epochs={epochs}"]
    job = start_job("finetune_blip", args, spot_cluster.address, tmp_path)
    log = tmp_path / "finetune" / "metrics.jsonl"
    started = time.perf_counter()
    # Epoch k's probe line is logged before its report, which waits until report k-1 was
    # collected: once epoch 2's line is there, epoch 0's checkpoint is registered.
    wait_for(lambda: any(r["epoch"] >= 2 and "probe_changed" in r for r in read_log(log)), job,
             "the third epoch logged")
    before = max(r["epoch"] for r in read_log(log)) + 1
    spot_cluster.lose_worker()
    code, said = finish(job)
    logged = read_log(log)
    steps = [r for r in logged if "loss" in r]  # a line per optimizer step; the probe's lines apart
    resumed = {r["resumed_at_epoch"] for r in steps} - {None}
    print_figures("finetune_blip, node lost once its third of 6 epochs was logged",
                  {"epochs": len({r["epoch"] for r in steps})},
                  time.perf_counter() - started, epochs_logged_before=before, resumed_at_epoch=sorted(resumed))
    assert code == 0, said[-3000:]
    assert before < epochs
    assert [r["epoch"] for r in logged if "probe_changed" in r] == list(range(-1, epochs))  # each epoch once
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))  # each optimizer step once
    assert sorted({r["epoch"] for r in steps}) == list(range(epochs))
    assert resumed and min(resumed) >= 1  # it went on from a checkpoint, not from the start
    assert (tmp_path / "blip" / "model.safetensors").exists() and (tmp_path / "finetune" / "_SUCCESS").exists()


# Where a job's Ray comes from when no address is given: next to the spot cluster (another
# Ray on the machine), as a user's machine may have one.
PROBE = ("import ray; from rayjobs.cluster import connect; connect(); "
         "print('GCS', ray.get_runtime_context().gcs_address)")


@pytest.mark.parametrize("address", [None, "cluster"])
def test_a_job_without_an_address_starts_its_own_ray_and_never_joins_another(spot_cluster, address):
    """With no `ray_address` and no $RAY_ADDRESS a job starts a Ray of its own on loopback,
    as documented, even while another Ray runs on the machine (the spot cluster, which
    Ray's own lookup in /tmp/ray/ray_current_cluster would join); given the address, it
    joins that one."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address:
        env["RAY_ADDRESS"] = spot_cluster.address
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    gcs = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("GCS"))
    assert (gcs == spot_cluster.address) == bool(address), (gcs, spot_cluster.address)
    assert gcs.startswith("127.0.0.1:")
