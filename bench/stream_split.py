"""Where the embedded default's generate and evaluate seconds go: the driver's steps, each
pool's actor start (process, imports, model build), the first batches, the FID pass.

    .venv/bin/python bench/stream_split.py [--out bench/results/stream_split.json]

Runs `python -m rayjobs.pipeline run_dir=…` (the embedded default, a local Ray) in a process
of its own, with $BLIPINPAINT_STREAM_TRACE set: the streams' actors and commit tasks then print
when they start, are built and run batches (`rayjobs.stream.trace`), and the driver, wrapped
here, prints when its steps start and end. Every mark is a wall-clock time, printed relative
to the pipeline process's start; the summary says, per stream, how long after the stream's
start each pool's actor process existed, entered its constructor (the imports before it),
was built (its model loaded) and ran its first batch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The driver's steps timed (module, attribute), wrapped in the pipeline's own process.
STEPS = [("ray", "init"), ("ray.data", "Dataset.materialize"), ("rayjobs.generate", "run"),
         ("rayjobs.stream", "run_stream"), ("rayjobs.train_scorer", "run"), ("rayjobs.finetune_blip", "run"),
         ("rayjobs.evaluate", "run"), ("rayjobs.evaluate", "compute_fid"), ("rayjobs.fid_pass", "row_features"),
         ("blipinpaint.builders", "decoder_survival")]

INNER = """
import functools, importlib, sys, time
def say(what):
    sys.stderr.write(f"[driver-trace] {what} at={time.time():.3f}\\n"); sys.stderr.flush()
say("python")
from rayjobs import pipeline
from rayjobs import stream
say("imported")
for module, name in STEPS:
    owner = importlib.import_module(module)
    *path, attr = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    def wrapped(*a, _f=getattr(owner, attr), _n=f"{module}.{name}", **k):
        say(f"> {_n}")
        try:
            return _f(*a, **k)
        finally:
            say(f"< {_n}")
    setattr(owner, attr, wrapped)
import rayjobs.generate, rayjobs.evaluate
rayjobs.generate.run_stream = rayjobs.evaluate.run_stream = stream.run_stream
sys.exit(pipeline.main(sys.argv[1:]))
"""

MARK = re.compile(r"\[(stream|driver)-trace\] (.+?)(?: pid=(\d+) process=(\S+))? at=([\d.]+)")


def parse(output: str, started: float) -> list[dict]:
    marks = []
    for m in MARK.finditer(output):
        kind, what, pid, process, at = m.groups()
        mark = {"what": what, "at": round(float(at) - started, 2)}
        if kind == "stream":
            mark.update(pid=int(pid), process=round(float(process) - started, 2) if process != "?" else None)
        marks.append(mark)
    return sorted(marks, key=lambda m: m["at"])


def pools(marks: list[dict], begin: float, end: float) -> dict[str, dict]:
    """Per stage of a stream running from `begin` to `end`: its actor's process start, its
    constructor's start, its model built, its first batch (seconds after `begin`)."""
    out: dict[str, dict] = {}
    for m in marks:
        if "pid" not in m or not begin <= m["at"] <= end:
            continue
        stage, event = m["what"].rsplit(" ", 1)
        row = out.setdefault(stage, {})
        if event == "init":
            row["process_s"] = round(m["process"] - begin, 2) if m["process"] is not None else None
        key = {"init": "init_s", "built": "built_s", "batch": "first_batch_s", "done": "first_done_s"}[event]
        row.setdefault(key, round(m["at"] - begin, 2))
    return out


def summarize(marks: list[dict]) -> dict:
    step = {}
    for m in marks:
        if "pid" in m:
            continue
        if m["what"].startswith("> "):
            step.setdefault(m["what"][2:], []).append([m["at"], None])
        elif m["what"].startswith("< "):
            open_ = [s for s in step[m["what"][2:]] if s[1] is None]
            open_[-1][1] = m["at"]
    seconds = {name: [round(b - a, 2) for a, b in spans] for name, spans in step.items()}
    streams = []
    for a, b in step.get("ray.data.Dataset.materialize", []):
        streams.append({"start": a, "seconds": round(b - a, 2), "pools": pools(marks, a, b)})
    fid = [{"start": a, "seconds": round(b - a, 2), "pools": pools(marks, a, b)}
           for a, b in step.get("rayjobs.fid_pass.row_features", [])]
    imported = next(m["at"] for m in marks if m["what"] == "imported")
    return {"driver_imports_s": imported, "steps_s": seconds, "streams": streams, "fid_pass": fid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/stream_split.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-split-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BLIPINPAINT_STREAM_TRACE": "1", "RAY_DEDUP_LOGS": "0"}
    load = os.getloadavg()
    started = time.time()
    done = subprocess.run([sys.executable, "-c", f"STEPS = {STEPS!r}\n{INNER}", "run_dir=run"], cwd=work, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    total = time.time() - started
    if done.returncode != 0:
        sys.exit(f"the pipeline failed ({done.returncode}):\n{done.stdout[-3000:]}")
    marks = parse(done.stdout, started)
    result = {"total_s": round(total, 1), "load_before": [round(x, 1) for x in load],
              "load_after": [round(x, 1) for x in os.getloadavg()], **summarize(marks), "marks": marks}
    print(json.dumps({k: v for k, v in result.items() if k != "marks"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
