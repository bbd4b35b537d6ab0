"""Test helpers: image files of every awkward kind, built in memory."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
from PIL import Image

from blipinpaint.records import SAMPLE_SCHEMA, encode_rows

# The README's main command with fewer epochs and two FID workers (tests/rayjobs/conftest.py runs
# it), fine-tuning at lr 1e-3 in batches of 4 (2 a worker): two steps that move the tiny decoder's captions,
# which test_finetune_blip reads from this run.
PIPELINE_ARGS = ["run_dir=run", "scorer.epochs=2", "finetune.epochs=2", "finetune.batch_size=4", "finetune.lr=1e-3",
                 "evaluate.fid.size=2"]

# How far two computations of the fused denoising loop's float images (in [0, 1]) may be
# apart and count as the same: measured (2026-12, torch 2.13 CPU) at most 1.7e-6 in fp32 and
# 2/256 in bf16 (two bf16 steps of values in [0.5, 1)) between the loop and the pipeline; the
# bounds leave room for another CPU's rounding order.
FUSED_TOLERANCE = {"fp32": 5e-6, "bf16": 3 / 255}


def copy_run(run_dir, to, parts=("generate", "scorer", "finetune", "blip")) -> None:
    """A copy of a run's folders, for a test that changes or adds to them."""
    import shutil

    for part in parts:
        shutil.copytree(f"{run_dir}/{part}", f"{to}/{part}")


def take(batch: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[index] for k, v in batch.items()}


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def photo(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    """A smooth RGB gradient with noise: compresses like a photograph, not like a flat fill."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    arr = arr + rng.normal(0, 8, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_shard(path, members: list[tuple[str, bytes]], cut: int | None = None) -> None:
    """A WebDataset tar shard of `members` (name, bytes), as img2dataset writes one; `cut`:
    only its first `cut` bytes (a truncated download)."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data if cut is None else data[:cut])


def png_with_size(width: int, height: int) -> bytes:
    """A valid PNG whose header claims `width`x`height` (pixel data for 1x1 only).

    Pillow reads the size from the header, so this is a decompression bomb that costs
    nothing to build.
    """
    data = encode(Image.new("L", (1, 1)), "PNG")
    ihdr_at = data.index(b"IHDR")
    fields = struct.pack(">II", width, height) + data[ihdr_at + 12:ihdr_at + 17]
    chunk = b"IHDR" + fields
    return data[:ihdr_at] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[ihdr_at + 21:]


def with_exif_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def download(uri) -> str:
    """A local folder with the files of `uri`: itself on a disk, a fresh copy of a bucket's."""
    import tempfile

    from pyarrow import fs as pafs

    from blipinpaint.storage import filesystem, is_remote

    if not is_remote(str(uri)):
        return str(uri)
    fs, path = filesystem(str(uri))
    local = tempfile.mkdtemp(prefix="blipinpaint-download-")
    pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def account(out_dir, inputs) -> dict:
    """What an output folder (on a disk or in a bucket) holds, read from its Parquet files and
    markers (not the job's own stats).

    `committed`: rows in `samples/` and `errors/`; `lost`: inputs in neither; `duplicated`:
    rows beyond one per id; `orphans`: files no marker accounts for (staged, half-written,
    or data without a marker).
    """
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    out = Path(download(out_dir))
    from blipinpaint.commit_log import CommitLog

    markers = {m["name"] for m in CommitLog(str(out)).markers()}  # loose and in checkpoints
    ids, orphans = [], []
    for folder in ("samples", "errors"):
        for path in sorted((out / folder).glob("*")) if (out / folder).exists() else []:
            if path.suffix != ".parquet" or path.stem not in markers:
                orphans.append(path)
                continue
            ids += pq.read_table(path, columns=["id"]).column("id").to_pylist()
    orphans += [p for p in (out / "_staging").rglob("*") if p.is_file()] if (out / "_staging").exists() else []
    orphans += [p for d in ("_commits", "_checkpoints") if (out / d).exists() for p in (out / d).glob(".*.tmp")]
    inputs = set(inputs)
    stats = json.loads((out / "stats.json").read_text()) if (out / "stats.json").exists() else {}
    return {"inputs": len(inputs), "committed": len(ids), "lost": len(inputs - set(ids)),
            "duplicated": len(ids) - len(set(ids)), "orphans": len(orphans), "retries": stats.get("retries"),
            "ids": ids}


def print_figures(case: str, figures: dict, wall_s: float, **extra) -> None:
    """One line per fault case; RELIABILITY.md's table is made of these (`pytest -s | grep FIGURES`)."""
    shown = {k: v for k, v in figures.items() if k != "ids"} | extra | {"wall_s": round(wall_s, 1)}
    print(f"\nFIGURES {case}: " + " ".join(f"{k}={v}" for k, v in shown.items()))


def sample_rows(ids, errors):
    """Rows of the generate step's schema for `ids` (an error row where `errors` says one), tiny images."""
    n = len(ids)
    batch = {
        "id": np.array(ids, dtype=object), "source": np.array([f"/x/{i}" for i in ids], dtype=object),
        "error": np.array(errors, dtype=object), "caption": np.array(["a cat"] * n, dtype=object),
        "caption_features": np.ones((n, 4), np.float32), "mask_kind": np.array(["box"] * n, dtype=object),
        "mask_area": np.full(n, 0.25, np.float32), "noise_seed": np.arange(n, dtype=np.int64),
        "width": np.full(n, 80, np.int32), "height": np.full(n, 60, np.int32),
        "image": np.zeros((n, 8, 8, 3), np.uint8), "mask": np.ones((n, 8, 8), np.uint8),
        "inpainted": np.zeros((n, 8, 8, 3), np.uint8), "inpainted_baseline": np.zeros((n, 8, 8, 3), np.uint8),
        "annotations": np.array([""] * n, dtype=object),
        "seconds_captioner": np.full(n, 0.5), "retries_captioner": np.eye(1, n, dtype=np.int64)[0],
    }
    for m in SAMPLE_SCHEMA.names:
        if m.startswith(("ssim", "psnr", "clip")):
            batch[m] = np.full(n, 1.0, np.float32)
    return encode_rows(batch, {"captioner": "c", "inpainter": "i", "clip": "k"})


def end_actors_of_dead_drivers(ray, driver_pid: int, timeout_s: float = 60.0) -> int:
    """Kill the actors a driver killed by a test (process `driver_pid`) left in the shared
    test Ray: its job's actors outlive it for a while and would hold CPUs the next tests
    wait for. Waits until Ray has seen the driver die and reports those actors dead;
    detached actors (Ray's own, shared by every job) are left alone. Returns how many."""
    import os
    import signal
    import time

    from ray._private import state  # the GCS's tables: the test Ray runs no dashboard for the state API

    deadline = time.monotonic() + timeout_s

    def wait(condition, what):
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    jobs = {j["JobID"] for j in state.jobs() if j["DriverPid"] == driver_pid}
    assert jobs, f"no Ray job has driver pid {driver_pid}"
    wait(lambda: all(j["IsDead"] for j in state.jobs() if j["JobID"] in jobs), "Ray did not see the driver die")

    def left():
        return [a for a in state.actors().values()
                if a["JobID"] in jobs and a["State"] != "DEAD" and not a["IsDetached"] and a["Pid"]]

    actors = left()
    for actor in actors:
        try:
            os.kill(actor["Pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait(lambda: not left(), "the killed driver's actors are still alive")
    return len(actors)


def await_no_live_actors(class_name: str, timeout_s: float = 60.0) -> None:
    """Wait until the shared test Ray holds no live actor of `class_name` (ray.kill is asynchronous)."""
    import time

    from ray._private import state

    deadline = time.monotonic() + timeout_s
    while live := [a for a in state.actors().values() if a["ActorClassName"] == class_name and a["State"] != "DEAD"]:
        assert time.monotonic() < deadline, f"{len(live)} {class_name} actors still alive"
        time.sleep(0.2)


def open_page(driver, path) -> dict:
    """Loads a local page in the `browser` fixture's Chromium (returns once its load event
    has fired: every image loaded or failed) and says what it did: its console errors, every
    URL it requested, its images that did not render."""
    import json

    for log in ("browser", "performance"):  # what earlier pages left in the logs
        driver.get_log(log)
    driver.get(f"file://{path}")
    events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    return {"console_errors": [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"],
            "urls": sorted({e["params"]["request"]["url"] for e in events
                            if e["method"] == "Network.requestWillBeSent"}),
            "broken_images": driver.execute_script(
                "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)"),
            "images": driver.execute_script("return document.images.length")}


def write_samples(run_dir, n=400, dim=16, seed=0, restored_exactly=()):
    """Caption features with a learnable, noisy relation to the three targets; the rows
    `restored_exactly` have an infinite PSNR (an inpainting equal to the ground truth)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    w = rng.normal(size=(dim, 3))
    z = x @ w / np.sqrt(dim) + 0.3 * rng.normal(size=(n, 3))
    psnr = (20 + 5 * z[:, 1]).astype(np.float32)
    psnr[list(restored_exactly)] = np.inf
    out = run_dir / "generate" / "samples"
    out.mkdir(parents=True)
    pq.write_table(pa.table({
        "id": [f"img{i:04d}" for i in range(n)], "caption_features": list(x),
        "ssim": (1 / (1 + np.exp(-z[:, 0]))).astype(np.float32),
        "psnr": psnr,
        "clip_score": (10 + 3 * z[:, 2]).astype(np.float32),
    }), out / "part-0.parquet")
    # The generate step's commit marker: the jobs after it read which samples exist from it.
    (run_dir / "generate" / "_commits").mkdir()
    (run_dir / "generate" / "_commits" / "part-0.json").write_text(json.dumps(
        {"name": "part-0", "samples": [f"img{i:04d}" for i in range(n)], "errors": [], "error_kinds": [],
         "staged": {"samples": "part-0.parquet"}}))
    (run_dir / "generate" / "_SUCCESS").write_text("")  # every input accounted for


def start_job(module: str, args: list[str], address: str, cwd) -> subprocess.Popen:
    """`python -m rayjobs.<module> <args>` joined to the Ray at `address`, as under `ray job submit`."""
    return subprocess.Popen([sys.executable, "-m", f"rayjobs.{module}", *args, f"ray_address={address}"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())


def wait_for(condition, job: subprocess.Popen, what: str, timeout_s: float = 300) -> None:
    """Poll `condition` (a file the job writes) until it holds; the job must still be running."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert job.poll() is None, f"the job ended before {what}:\n{job.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
