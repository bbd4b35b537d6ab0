"""The runs of the generate job that `bench/scale.py` watches from outside or repeats: the
first parts of a real run (`first_parts`) and a rerun with nothing to do (`noop_rerun`),
each a process of its own running a script of `scale_scripts`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from scale_scripts import BUILD_DONE, COPY_RUN, FIRST, NOOP

LEAST_WORK = ["data.image_size=64", "inpaint.num_inference_steps=1", "caption.max_new_tokens=3",
              "stream.read.batch_size=32", "stream.captioner.batch_size=32", "stream.inpainter.batch_size=16",
              "stream.metrics.batch_size=32", "stream.rows_per_file=256"]


def result(done: subprocess.CompletedProcess) -> dict:
    """What a script of `scale_scripts` printed on its `RESULT` line (its error when it failed)."""
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def _driver_mb(pid: int) -> dict:
    """The process's peak and current RSS (`VmHWM`, `VmRSS`), in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"peak_rss_mb": round(int(fields["VmHWM"].split()[0]) / 1024),
            "rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024)}


def _markers(run_dir: str) -> list[str]:
    """The loose commit markers of the run's generate folder, on the disk or in a bucket (a listing)."""
    from pyarrow import fs as pafs

    from blipinpaint.storage import filesystem

    fs, root = filesystem(run_dir.rstrip("/") + "/generate/_commits")
    found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return [i.base_name for i in found if i.base_name.endswith(".json") and not i.base_name.startswith(".")]


def first_parts(size: int, folder: Path, run_dir: str, address: str, env: dict, more: int,
                timeout_s: float, out: Path) -> dict:
    """A real run (`FIRST`) over `folder` (WebDataset shards), watched from outside: when its
    first part is committed (a marker appears in `_commits/`) and when `more` parts after it
    are, in seconds from the process's start and from its call of `generate.run`, with the
    driver's peak RSS at each; then the run is killed (and its Ray workers freed). A run with no
    part after `timeout_s` is killed too, its row saying so (`"first": null`) with the driver's peak.
    `run_dir` on the disk or in a bucket; the run's output goes to `out`."""
    import ray

    overrides = [f"run_dir={run_dir}", f"data.source={folder}", f"ray_address={address}", *LEAST_WORK]
    out.parent.mkdir(parents=True, exist_ok=True)
    row, called = {"inputs": size, "shards": len(list(folder.glob("*.tar"))),
                   "run_dir": "S3 endpoint" if "://" in run_dir else "local disk"}, None
    with open(out, "w") as log:
        started = time.time()
        proc = subprocess.Popen([sys.executable, "-c", FIRST, *overrides], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    try:
        while True:  # polls for the events: the CALL line, then the markers
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended first (rc {proc.returncode}): {out.read_text()[-3000:]}")
            if called is None:
                line = next((x for x in out.read_text().splitlines() if x.startswith("CALL ")), None)
                if line:
                    called = json.loads(line[5:])
                    row["call_at_s"] = round(called["t"] - started, 2)
                    row["rss_imported_mb"] = round(called["rss_imported_mb"])
            names = _markers(run_dir)
            now = time.time()
            if "first" not in row and now - started > timeout_s:
                row["first"], row["no_part_after_s"] = None, round(now - started, 1)
                row.update(_driver_mb(proc.pid))
                break
            if names and "first" not in row and called is not None:
                row["first"] = {"parts": len(names), "from_start_s": round(now - started, 1),
                                "from_call_s": round(now - called["t"], 1), **_driver_mb(proc.pid)}
                print(json.dumps(row), flush=True)
            if "first" in row and len(names) >= row["first"]["parts"] + more:
                row["more"] = {"parts": len(names), "from_start_s": round(now - started, 1),
                               "from_call_s": round(now - called["t"], 1), **_driver_mb(proc.pid)}
                break
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        time.sleep(0.2)  # until the killed driver's workers are gone: the next run starts on a free Ray
    row["load_average"] = os.getloadavg()[0]
    print(json.dumps(row), flush=True)
    return row


def noop_rerun(size: int, folder: Path | str, run_dir: str, env: dict, rows: int, repeats: int,
               copied_from: dict | None = None) -> list[dict]:
    """A run's whole log made for `folder`'s shards through the writer (`BUILD_DONE`, every id an
    error row, `rows` a part), then the same command again `repeats` times, each in a process of
    its own (`NOOP`): what a rerun with nothing to do costs, with the driver's peak RSS.
    `copied_from`: instead of building it, copy the run folder another `noop_rerun` built
    (`{"run_dir": ..., "parts": ..., "build_s": ...}`) to `run_dir` (`COPY_RUN`: its log
    compacted there once, as the run writing it there would have left it)."""
    overrides = [f"run_dir={run_dir}", f"data.source={folder}", "data.kind=webdataset"]
    if copied_from is None:
        built = result(subprocess.run([sys.executable, "-c", BUILD_DONE, str(rows), *overrides],
                                      capture_output=True, text=True, env=env))
    else:
        copied = result(subprocess.run([sys.executable, "-c", COPY_RUN, copied_from["run_dir"], run_dir],
                                       capture_output=True, text=True, env=env))
        built = {"parts": copied_from["parts"], "build_s": copied_from["build_s"], "copied_s": copied["copy_s"]}
    out = []
    for _ in range(repeats):
        row = result(subprocess.run([sys.executable, "-c", NOOP, *overrides], capture_output=True, text=True,
                                    env=env))
        assert row["inputs"] == size, row
        row = {"run_dir": "S3 endpoint" if "://" in run_dir else "local disk", "parts": built["parts"],
               **{k: round(v, 1) for k, v in built.items() if k.endswith("_s")},
               **{k: round(v, 2) for k, v in row.items() if k != "inputs"},
               "inputs": size, "load_average": os.getloadavg()[0]}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out
