"""A run's end over a large commit log, each step in a fresh process: its seconds and peak RSS.

At a run's end the driver accounts for every listed id (`CommitLog.account`), writes
`stats.json` (`generate.summarize`: counts and the metric means over the committed samples),
and each training job splits the committed samples (`reader.split_reads`). This runs one of
those steps over an existing log (`run_dir/generate`, e.g. one `bench/scale.py --log-existing`
or a writer loop built) in a process of its own and prints one JSON line: the step's seconds,
the process's peak RSS (`VmHWM`, as `bench/scale.py` reads it), and its RSS after the imports.
Nothing is written to the log (the split and means only read it):

    .venv/bin/python bench/run_end.py RUN_DIR build [--parts 40000]
    .venv/bin/python bench/run_end.py RUN_DIR account|summarize|split [--as-list]

`build` writes such a log through the project's writer: `--parts` parts of 256 rows, half
of each samples (metric values, the other columns null), half errors, then compacted.
`account` is `account(listed)` over every committed id, given as an Arrow array (`--as-list`:
as a Python list, as the callers before Arrow passed it); `summarize` is that and `summarize`.
"""

from __future__ import annotations

import argparse
import json
import time


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024


def build(out_dir: str, parts: int, rows: int = 256) -> None:
    import pyarrow as pa

    from blipinpaint.commit_log import CommitLog
    from blipinpaint.records import METRIC_COLUMNS, SAMPLE_SCHEMA

    log, started = CommitLog(out_dir, compact_every=0), time.perf_counter()
    for k in range(parts):
        ids = pa.array([f"{k:08d}.tar/{j:05d}.jpg" for j in range(rows)], pa.string())
        columns = {f.name: pa.nulls(rows, f.type) for f in SAMPLE_SCHEMA} | {"id": ids, "source": ids}
        columns |= {m: pa.array([float(j % 7) for j in range(rows)], pa.float32()) for m in METRIC_COLUMNS}
        columns["error"] = pa.array([""] * (rows // 2) + ["not an image: bench"] * (rows - rows // 2))
        columns["seconds_prepare"] = pa.array([0.01] * rows)
        log.commit(pa.table(columns))
    print(json.dumps({"built": parts, "compacted": log.compact(), "seconds": round(time.perf_counter() - started, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("step", choices=("build", "account", "summarize", "split"))
    parser.add_argument("--as-list", action="store_true", help="the listed ids as a Python list")
    parser.add_argument("--parts", type=int, default=40000, help="build: parts of 256 rows")
    args = parser.parse_args()
    if args.step == "build":
        from blipinpaint.layout import RunLayout

        build(RunLayout(args.run_dir).generate, args.parts)
        return
    from blipinpaint.commit_log import CommitLog
    from blipinpaint.config import load_config
    from blipinpaint.layout import RunLayout
    from blipinpaint.reader import split_reads
    from rayjobs import generate

    out_dir, imports_mb = RunLayout(args.run_dir).generate, peak_mb()
    started = time.perf_counter()
    result = {"step": args.step, "as_list": args.as_list}
    if args.step == "split":
        train, held = split_reads(load_config(overrides=[f"run_dir={args.run_dir}"]))
        result |= {"train_reads": len(train), "heldout_reads": len(held),
                   "heldout_ids": sum(len(r["ids"]) for r in held)}
    else:
        log = CommitLog(out_dir)
        listed = log.committed_id_array()
        account = log.account(listed.to_pylist() if args.as_list else listed)
        result |= {"listed": account.listed, "errors": account.errors}
        if args.step == "summarize":
            stats = generate.summarize(out_dir, account, {})
            result |= {k: stats[k] for k in ("ok", "missing", "duplicates", "means")}
    result |= {"seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": round(peak_mb()),
               "imports_rss_mb": round(imports_mb)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
