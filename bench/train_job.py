"""The scorer job end to end on a local Ray: its wall time on synthetic cached features.

    .venv/bin/python bench/train_job.py [--samples 400] [--runs 3] [dotted.key=value ...]

Training the scorer is milliseconds of arithmetic; what a run costs is the fixed part:
reading the generated samples, starting the Ray Train worker group, DeepSpeed's set-up,
the reports and the held-out evaluation. Each run trains a new scorer in the same `run_dir`
on one local Ray (the first run also warms that Ray, so it is reported apart). To compare
two trees of this project, run the script from each with `PYTHONPATH=<tree>` (Ray's
workers inherit it; BENCHMARKS.md gives the command).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from blipinpaint.config import load_config
from rayjobs import train_scorer
from rayjobs.cluster import connect


def write_samples(run_dir: Path, n: int, dim: int = 16, seed: int = 0) -> None:
    """One committed part of `n` samples: caption features and the three targets."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    z = x @ rng.normal(size=(dim, 3)) / np.sqrt(dim) + 0.3 * rng.normal(size=(n, 3))
    ids = [f"img{i:06d}" for i in range(n)]
    (run_dir / "generate" / "samples").mkdir(parents=True)
    pq.write_table(pa.table({"id": ids, "caption_features": list(x), "ssim": (1 / (1 + np.exp(-z[:, 0]))),
                             "psnr": 20 + 5 * z[:, 1], "clip_score": 10 + 3 * z[:, 2]}),
                   run_dir / "generate" / "samples" / "part-0.parquet")
    (run_dir / "generate" / "_commits").mkdir()
    (run_dir / "generate" / "_commits" / "part-0.json").write_text(json.dumps(
        {"name": "part-0", "samples": ids, "errors": [], "error_kinds": [], "staged": {"samples": "part-0.parquet"}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3)
    args, overrides = parser.parse_known_args()
    run_dir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    write_samples(run_dir, args.samples)
    cfg = load_config(overrides=[f"run_dir={run_dir}", "scorer.epochs=2", "scorer.hidden=[16]", *overrides])
    connect()
    walls = []
    for _ in range(args.runs):
        shutil.rmtree(run_dir / "scorer", ignore_errors=True)
        started = time.perf_counter()
        train_scorer.run(cfg)
        walls.append(time.perf_counter() - started)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps({"samples": args.samples, "first_run_s": round(walls[0], 1),
                      "later_runs_s": [round(w, 1) for w in walls[1:]],
                      "median_later_s": round(statistics.median(walls[1:]), 1) if len(walls) > 1 else None}))


if __name__ == "__main__":
    main()
