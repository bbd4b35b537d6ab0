"""Where a training job's seconds go: one timeline from a pipeline run's own logs.

    RAY_TMPDIR=/tmp/tl/ray RAY_DEDUP_LOGS=0 .venv/bin/python -u -m rayjobs.pipeline run_dir=run > out.log 2>&1
    .venv/bin/python bench/train_timeline.py out.log /tmp/tl/ray

Merges, in time order, the driver's log lines (`out.log`: the jobs' INFO lines) with Ray
Train's own logs of that Ray session (under the `RAY_TMPDIR` the run used: the controller's
worker-group start, each worker's process group, checkpoints, reports and shutdown), each
line with the seconds since the previous one. Lines a worker prints as `T34 <epoch seconds>
<label>` (timestamps added by hand inside a training loop, as BENCHMARKS.md's split was
measured) are merged too.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import re

STAMP = "%Y-%m-%d %H:%M:%S,%f"


def events(out_log: str, ray_tmpdir: str) -> list[tuple[float, str]]:
    found = set()
    for line in open(out_log, errors="replace"):
        if m := re.search(r"T34 ([0-9.]+) (.*)$", line):
            pid = re.search(r"pid=(\d+)", line)
            found.add((float(m.group(1)), m.group(2) + (f" [pid {pid.group(1)}]" if pid else "")))
        elif (m := re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) (\S+) (.*)", line)) and \
                m.group(2).startswith(("blipinpaint", "rayjobs")):
            found.add((datetime.datetime.strptime(m.group(1), STAMP).timestamp(), f"driver: {m.group(3)[:100]}"))
    for path in glob.glob(f"{ray_tmpdir}/**/logs/train/ray-train-sys-*.log", recursive=True):
        who = "controller" if "controller" in path else "worker " + path.rsplit("-", 1)[-1][:6]
        for line in open(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            found.add((datetime.datetime.strptime(record["asctime"], STAMP).timestamp(),
                       f"{who}: " + record["message"][:110].replace("\n", " ")))
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_log")
    parser.add_argument("ray_tmpdir")
    args = parser.parse_args()
    timeline = events(args.out_log, args.ray_tmpdir)
    start = previous = timeline[0][0] if timeline else 0.0
    for t, what in timeline:
        print(f"{t - start:8.2f} +{t - previous:6.2f}  {what}")
        previous = t


if __name__ == "__main__":
    main()
