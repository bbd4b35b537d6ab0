"""What a whole-node loss costs: generate and the scorer training, each run undisturbed and
then with its worker node removed mid-job (a spot preemption) and a replacement added at
once, one after the other on the same simulated cluster; the ratio of their wall times.

    python bench/node_loss.py [--photos 24] [--epochs 12]

The cluster is `ray.cluster_utils.Cluster` on 127.0.0.1: a head with no CPU (the drivers
attach there) and one worker node of 2 CPUs. Tiny preset; each job runs as a process of
its own joined to that cluster, as under `ray job submit`. Prints one JSON line per job.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every raylet on 127.0.0.1

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from blipinpaint.commit_log import CommitLog  # noqa: E402
from blipinpaint.config import sample_images_dir  # noqa: E402


def photos(root: Path, n: int) -> Path:
    """The shipped photographs and smooth noisy gradients up to `n` images."""
    root.mkdir(parents=True)
    shipped = [p for p in sorted(sample_images_dir().iterdir()) if p.suffix in (".jpg", ".png")]
    for path in shipped[:n]:
        shutil.copy(path, root / path.name)
    rng = np.random.default_rng(0)
    for i in range(n - min(n, len(shipped))):
        y, x = np.mgrid[0:90, 0:120]
        arr = np.stack([x * 2, y * 2.8, (x + y)], axis=-1) + rng.normal(0, 8, (90, 120, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / f"made-{i}.png")
    return root


def scorer_samples(run_dir: Path, n: int = 400, dim: int = 16) -> None:
    """Caption features with a learnable relation to the three targets, as generate commits them."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    z = x @ rng.normal(size=(dim, 3)) / np.sqrt(dim)
    ids = [f"img{i:04d}" for i in range(n)]
    out = run_dir / "generate"
    (out / "samples").mkdir(parents=True)
    (out / "_commits").mkdir()
    pq.write_table(pa.table({"id": ids, "caption_features": list(x), "ssim": (1 / (1 + np.exp(-z[:, 0]))),
                             "psnr": 20 + 5 * z[:, 1], "clip_score": 10 + 3 * z[:, 2]}),
                   out / "samples" / "part-0.parquet")
    (out / "_commits" / "part-0.json").write_text(json.dumps(
        {"name": "part-0", "samples": ids, "errors": [], "error_kinds": [], "staged": {"samples": "part-0.parquet"}}))
    (out / "_SUCCESS").write_text("")


def epochs_logged(run_dir: Path, at_least: int) -> bool:
    log = run_dir / "scorer" / "metrics.jsonl"
    return log.exists() and len(log.read_text().splitlines()) >= at_least


def committed(out: str) -> bool:
    return Path(out, "_commits").exists() and bool(CommitLog(out).markers())


def timed(job: str, args: list[str], cluster: Cluster, worker, lose_when=None):
    """Run `job`; with `lose_when` (a condition polled on its files), remove the worker node
    once it holds and add a replacement. Returns (seconds, exit code, the worker node now)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", f"rayjobs.{job}", *args, f"ray_address={cluster.address}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if lose_when is not None:
        while not lose_when():
            if proc.poll() is not None:
                raise RuntimeError(f"{job} ended before the node could be removed")
            time.sleep(0.1)
        # As the suite's fixture: the node's workers end with it (remove_node kills the raylet
        # only, and a busy worker notices that late).
        started_by_node = psutil.Process(worker.all_processes["raylet"][0].process.pid).children(recursive=True)
        cluster.remove_node(worker, allow_graceful=False)
        for process in started_by_node:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    code = proc.wait()
    return time.perf_counter() - started, code, worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=12)
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="node-loss-bench-"))
    source = photos(work / "photos", opts.photos)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    try:
        for job, lose_at in (("generate", "its first commit"), ("train_scorer", "its third epoch")):
            times = {}
            # A first run of each job (not measured) pays the one-time costs: the model store
            # filled, the cluster's first workers started.
            for case in ("warm-up", "undisturbed", "node lost"):
                run_dir = work / f"{job}-{case.replace(' ', '-')}"
                if job == "generate":
                    args = [f"run_dir={run_dir}", f"data.source={source}", "stream.rows_per_file=4"]
                    condition = functools.partial(committed, str(run_dir / "generate"))
                else:
                    scorer_samples(run_dir)
                    args = [f"run_dir={run_dir}", f"scorer.epochs={opts.epochs}", "scorer.hidden=[16]",
                            "scorer.checkpoint_every=1"]
                    condition = functools.partial(epochs_logged, run_dir, 3)
                seconds, code, worker = timed(job, args, cluster, worker, condition if case == "node lost" else None)
                if code != 0:
                    raise RuntimeError(f"{job} ({case}) exited {code}: see {run_dir}")
                times[case] = seconds
            print(json.dumps({"job": job, "node lost at": lose_at, "photos": opts.photos if job == "generate" else None,
                              "epochs": opts.epochs if job == "train_scorer" else None,
                              "undisturbed_s": round(times["undisturbed"], 1),
                              "node_lost_s": round(times["node lost"], 1),
                              "ratio": round(times["node lost"] / times["undisturbed"], 2),
                              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}), flush=True)
    finally:
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
