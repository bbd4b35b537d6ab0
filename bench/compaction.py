"""What a run's compactions cost as the run grows: a run of P parts committed through the
writer (`CommitLog.commit`, 256 error rows a part, as `bench/scale.py --log-markers`
builds its log; a new `CommitLog` a part, as a commit task has, so no checkpoint read or
written before is kept in memory) with `stream.compact_every` = 500, on the local disk, each size in a
process of its own and a fresh folder. Reports the seconds the commits spent compacting
(`_maybe_compact`, the writer's compaction), wall and CPU (the process's, all threads:
what a loaded machine changes least), the checkpoint bytes they wrote, the most a
single one took, the checkpoints present at the end, a new reader's read of the ids then,
and the run's end (`compact()`, one checkpoint). `--code` runs another tree's
`blipinpaint` (e.g. main's, exported with `git archive`) through the same script.

    .venv/bin/python bench/compaction.py --parts 5000 20000 --out /tmp/after.json
    mkdir -p /tmp/main && git archive main blipinpaint | tar -x -C /tmp/main
    .venv/bin/python bench/compaction.py --parts 5000 20000 --code /tmp/main --out /tmp/before.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import json, sys, time
from blipinpaint import commit_log
from blipinpaint.checkpoints import CHECKPOINTS
from blipinpaint.commit_log import CommitLog
from blipinpaint.records import encode_rows

folder, parts, rows, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
spent = {"compact_s": 0.0, "compact_cpu_s": 0.0, "check_s": 0.0, "check_cpu_s": 0.0, "compactions": 0,
         "max_s": 0.0, "max_cpu_s": 0.0, "bytes": 0}
compact, put = CommitLog._maybe_compact, CommitLog._put

def timed_compact(self, every):
    loose = len(self._names("_commits"))
    t0, c0 = time.perf_counter(), time.process_time()
    compact(self, every)
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    if every and loose >= every:  # a compaction (its listing of `_commits/` included)
        spent["compactions"] += 1
        spent["compact_s"] += took
        spent["compact_cpu_s"] += cpu
        spent["max_s"] = max(spent["max_s"], took)
        spent["max_cpu_s"] = max(spent["max_cpu_s"], cpu)
    else:  # the listing of `_commits/` every commit makes to know whether to compact
        spent["check_s"] += took
        spent["check_cpu_s"] += cpu

def counted_put(self, where, name, data):
    if where == CHECKPOINTS:
        spent["bytes"] += len(data)
    put(self, where, name, data)

CommitLog._maybe_compact, CommitLog._put = timed_compact, counted_put
t0 = time.perf_counter()
for k in range(parts):
    ids = [f"{k:08d}.tar/{j:05d}.jpg" for j in range(rows)]
    log = CommitLog(folder, compact_every=every)  # a commit task's: nothing read before is kept
    log.commit(encode_rows({"id": ids, "source": ids, "error": ["not an image: bench"] * rows,
                            "seconds_prepare": [0.01] * rows}, models={}))
spent["run_s"] = time.perf_counter() - t0
spent["checkpoints_at_end"] = len(CommitLog(folder)._names(CHECKPOINTS, commit_log.CHECKPOINT_NAME))
import blipinpaint
assert blipinpaint.__file__.startswith(sys.argv[5]), blipinpaint.__file__  # the tree asked for
t0, c0 = time.perf_counter(), time.process_time()
ids = CommitLog(folder).committed_id_array()
spent["read_ids_s"], spent["read_ids_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
assert len(ids) == parts * rows, len(ids)
written = spent["bytes"]
t0, c0 = time.perf_counter(), time.process_time()
done = CommitLog(folder).compact()
spent["end_compact_s"], spent["end_compact_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
spent["end_bytes"] = spent["bytes"] - written
spent["final_checkpoint_bytes"] = done["bytes"] if done else None
print("RESULT " + json.dumps(spent))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--code", default=str(Path(__file__).resolve().parent.parent),
                        help="the tree whose blipinpaint runs (default: this one)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the runs' folders go (deleted after)")
    parser.add_argument("--out", help="a JSON file for the results")
    args = parser.parse_args()
    code = Path(args.code).resolve()
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    results = []
    for parts in args.parts:
        folder = tempfile.mkdtemp(prefix=f"compaction-{parts}-", dir=args.dir)
        try:
            env = {**os.environ, "PYTHONPATH": str(code)}
            # In the run's folder: `-c` puts the working directory first on the path (not this tree).
            proc = subprocess.run([sys.executable, "-c", RUN, f"{folder}/out", str(parts), str(args.rows),
                                   str(args.every), str(code)], env=env, cwd=folder,
                                  capture_output=True, text=True, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"the run of {parts} parts failed:\n{proc.stderr[-3000:]}")
            result = {"parts": parts, "rows": args.rows, "every": args.every, "code": str(code),
                      "commit": commit.stdout.strip() or None, "load": os.getloadavg(), **json.loads(line[7:])}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
