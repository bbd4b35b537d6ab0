"""Whole-node loss, as a spot preemption: the worker node running a job's work removed without
grace at a point the test waits for, a replacement added, and the job finishes by itself
(`conftest.SpotCluster`). Each job runs in a process of its own joined to that cluster, as
under `ray job submit`; what it did is read from its files. Each case prints its figures
(`FIGURES ...`), which RELIABILITY.md reports."""

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import PIPELINE_ARGS, copy_run, print_figures

from blipinpaint.config import load_config
from rayjobs import evaluate


def start(job: str, args: list[str], cluster, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"rayjobs.{job}", *args, f"ray_address={cluster.address}"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy())


def wait_for(condition, job: subprocess.Popen, what: str, timeout_s: float = 300) -> None:
    """Poll `condition` (a file the job writes) until it holds; the job must still be running."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert job.poll() is None, f"the job ended before {what}:\n{job.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


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
    job = start("evaluate", [*args, "stream.inject_failure.stage=fid", f"stream.inject_failure.id={ids[-1]}",
                             f"stream.inject_failure.hold={gate}"], spot_cluster, tmp_path)
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
