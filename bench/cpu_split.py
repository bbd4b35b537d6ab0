"""Where the embedded default's CPU seconds go: each process of the run, by its role.

    .venv/bin/python bench/cpu_split.py [--tree PATH] [--out bench/results/cpu_split.json]

Runs `python -m rayjobs.pipeline run_dir=…` (the embedded default, its own local Ray) in a
process of its own and reads its process tree every 0.1 s (psutil): each process descended from it (Ray's
daemons, every worker and actor) with its CPU seconds (user + system) and its title
(`ray::RayTrainWorker`, ...). A process is counted at its last reading, so one that ends
between two readings loses at most 0.1 s of CPU. The whole machine's busy seconds over the
run (/proc/stat) are reported beside it: on a quiet machine the two agree, and their ratio
to the wall time says whether the run waited or computed.

`--tree` runs another checkout's code (a `git worktree` of an older commit, say) through
this environment, as `bench/defaults.py` does.

A worker's title changes over its life (`ray::IDLE`, the task it runs, the actor it becomes);
every title a process showed is kept, and its role is the first of `ROLES` that any of them
matches (the rest falls under "other").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

# (role, what a title holds), first match wins: the processes a pipeline run starts.
ROLES = [
    ("model actors of the streams (captioner, inpainter, metrics)", ("ModelStage",)),
    ("the FID actor", ("FidStage",)),
    ("Ray Train workers", ("RayTrainWorker",)),
    ("Ray Train controllers", ("TrainController",)),
    ("Ray Train's helper actors", ("PreemptionWatcher", "PlacementGroupCleaner", "SynchronizationActor",
                                   "DatasetManager", "SplitCoordinator")),
    ("Ray Data's helper actors", ("_StatsActor", "ActorLocationTracker", "_Autoscaling", "AutoscalingRequester")),
    ("the jobs' attempt ledgers", ("AttemptLedger",)),
    ("Ray's daemons (GCS, raylet, dashboard, agents, monitors)",
     ("gcs_server", "raylet/raylet", "dashboard.py", "ray-dashboard-", "DashboardAgent", "RuntimeEnvAgent",
      "log_monitor.py", "_private/monitor.py", "multiprocessing.forkserver", "multiprocessing.resource_tracker")),
    ("task workers (reads, commits, bootstrap; IDLE once done)", ("ray::",)),
    ("the driver (python -m rayjobs.pipeline)", ("rayjobs.pipeline",)),
]


def role(titles: list[str]) -> str:
    return next((name for name, marks in ROLES if any(m in t for m in marks for t in titles)), "other")


def sample(root: psutil.Process, seen: dict[int, tuple[float, list[str]]]) -> None:
    """One reading of `root` and its descendants into `seen`, {pid: (CPU seconds at the last
    reading, every title the process showed)}."""
    for proc in [root, *root.children(recursive=True)]:
        try:
            with proc.oneshot():
                times, title = proc.cpu_times(), " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:  # gone meanwhile: its last reading stands
            continue
        titles = seen.get(proc.pid, (0.0, []))[1]
        seen[proc.pid] = (times.user + times.system, titles if title in titles else [*titles, title])


def machine_busy() -> float:
    """CPU seconds the whole machine has spent neither idle nor waiting on I/O since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - times.iowait - getattr(times, "guest", 0) - getattr(times, "guest_nice", 0)


def summarize(seen: dict[int, tuple[float, list[str]]]) -> dict[str, dict]:
    """Per role: its processes and their CPU seconds, the largest role first."""
    roles: dict[str, dict] = defaultdict(lambda: {"processes": 0, "cpu_s": 0.0})
    for cpu, titles in seen.values():
        row = roles[role(titles)]
        row["processes"] += 1
        row["cpu_s"] += cpu
    return {k: {**v, "cpu_s": round(v["cpu_s"], 1)} for k, v in sorted(roles.items(), key=lambda kv: -kv[1]["cpu_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", help="the checkout whose code runs (default: this one)")
    parser.add_argument("--out", default="bench/results/cpu_split.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"PYTHONPATH": str(Path(args.tree).resolve())} if args.tree else {})}
    env.pop("RAY_ADDRESS", None)
    load, busy, started = os.getloadavg(), machine_busy(), time.time()
    log = work / "pipeline.log"  # a file, not a pipe: nothing reads a pipe while the run goes on
    with log.open("w") as out:
        run = subprocess.Popen([sys.executable, "-m", "rayjobs.pipeline", "run_dir=run"], cwd=work, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    seen: dict[int, tuple[float, list[str]]] = {}
    root = psutil.Process(run.pid)
    while run.poll() is None:
        sample(root, seen)
        time.sleep(0.1)
    wall, busy = time.time() - started, machine_busy() - busy
    if run.returncode != 0:
        sys.exit(f"the pipeline failed ({run.returncode}):\n{log.read_text()[-3000:]}")
    roles = summarize(seen)
    counted = sum(r["cpu_s"] for r in roles.values())
    result = {"tree": args.tree or ".", "wall_s": round(wall, 1), "machine_busy_cpu_s": round(busy, 1),
              "counted_cpu_s": round(counted, 1),
              "cores": os.cpu_count(), "busy_fraction": round(busy / (wall * os.cpu_count()), 2),
              "load_before": [round(x, 1) for x in load], "load_after": [round(x, 1) for x in os.getloadavg()],
              "roles": roles, "processes": sorted(([round(c, 2), t] for c, t in seen.values()), reverse=True)}
    print(json.dumps({k: v for k, v in result.items() if k != "processes"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
