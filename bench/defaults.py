"""The embedded default pipeline at two commits: its run time and its numbers.

    .venv/bin/python bench/defaults.py BASE [HEAD] [--repeats 2] [--out bench/results/defaults.json]

Each commit is checked out in a temporary git worktree, and the README's main command
(`python -m rayjobs.pipeline`, each run in a fresh folder and its own local Ray) runs from
there, alternating between the commits, `--repeats` times each, so that a machine that
slows down or speeds up over the run weighs on both alike. Reports each run's wall time,
the median per commit and HEAD's over BASE's, and whether the runs' numbers are equal
(between the commits, and, as a control, between a commit's own runs):
generate's metric means, the fine-tuned probe captions, and the evaluation's variants,
intervals, mask buckets and caption effect (report.json, without its times and paths).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["run_dir=run"]  # the README's main command: the embedded default


def numbers(run: Path) -> dict:
    """What a run computed, without what may differ between equal runs (times, paths)."""
    report = json.loads((run / "eval" / "report.json").read_text())
    probe = json.loads((run / "finetune" / "report.json").read_text())["probe"]
    return {"generate_means": json.loads((run / "generate" / "stats.json").read_text())["means"],
            "probe_captions": [(p["id"], p["fine_tuned"]) for p in probe],
            **{k: report[k] for k in ("variants", "intervals", "mask_buckets", "caption_effect")}}


def run_once(tree: Path, folder: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rayjobs.pipeline", *ARGS], cwd=folder, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("head", nargs="?", default="HEAD")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "defaults.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        trees = {}
        for name, rev in (("base", args.base), ("head", args.head)):
            trees[name] = scratch / name
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(trees[name]), rev],
                           check=True)
        try:
            seconds, results = {"base": [], "head": []}, {}
            for k in range(args.repeats):
                for name, tree in trees.items():
                    folder = scratch / f"{name}-{k}"
                    folder.mkdir()
                    seconds[name].append(round(run_once(tree, folder), 1))
                    results.setdefault(name, []).append(numbers(folder / "run"))
                    print(f"{name} run {k}: {seconds[name][-1]} s", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    base, head = results["base"][0], results["head"][0]
    figures = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores", "base": args.base, "head": args.head, "seconds": seconds,
               "median_s": medians, "head_over_base": round(medians["head"] / medians["base"], 3),
               # The control: is a commit's every run equal to its first?
               "numbers_repeat": {name: all(r == runs[0] for r in runs) for name, runs in results.items()},
               "numbers_equal": base == head, "differing": sorted(k for k in base if base[k] != head[k])}
    print(json.dumps(figures, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
