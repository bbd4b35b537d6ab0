"""How the generate job's own cost grows with the number of inputs (tiny preset, least work per image).

    .venv/bin/python bench/scale.py [--sizes 1000 10000] [--s3-size 10000] [--out bench/results/scale.json]

Each size gets fresh inputs (64x64 JPEG crops of the shipped photographs) and a fresh
`run_dir`, with the least model work per image (one denoising step, 3 caption tokens, 64²),
so what is measured is the system: listing, scheduling, batching, committing. Each run is
a subprocess of its own, joined to one local Ray started first (not timed), so that its
peak memory (`VmHWM`, see `scale_scripts`) is that run's driver alone. Per size it reports:

- rows/s of the pipeline (actor start and model load included) and of the whole command;
- the driver's peak RSS, and the RSS after listing the inputs (what the listing holds);
- the number of committed parts, and when the first, median and last were committed;
- the wall time of the same command again, which finds nothing to do.

`--s3-size` runs that size once more with `run_dir` in a bucket of moto's S3 server (a
process of its own on 127.0.0.1), the inputs on the local disk.

`--log-markers N` (`--s3-log-markers N` on the S3 endpoint) times the commit log's read:
N parts of `--log-rows` rows committed through the writer, read by a new reader before and
after one compaction (`blipinpaint.checkpoints`): the ids as an Arrow array, a resume, the
ids as a Python set; and the process's peak memory. Above `--s3-log-build` markers the S3
log is built and compacted on the disk and copied to the endpoint (no read before
compaction there). With `--sizes` empty and `--s3-size 0` only that runs (no Ray):

    .venv/bin/python bench/scale.py --sizes --s3-size 0 --log-markers 40000 --s3-log-markers 2000

`--list-sizes N ...` times the listing of a WebDataset source of N inputs (shards of
`--shard-images` small images, written by `make_shards`), each in a process of its own:
`list_inputs` (the whole listing as one list, what a real run's driver does) and
`dry_run=true` through `generate.run` (the listing read in pages, `source_pages`), with the
process's peak RSS; both import the job first, so the figures differ by the listing alone.
Alone (no Ray):

    .venv/bin/python bench/scale.py --sizes --s3-size 0 --list-sizes 10000 1000000

`--dry-run-only` leaves `list_inputs` out (at 10^7 it would hold about 10 GB): the shards
are written once (a template shard's bytes, about 15 GB at 10^7, in a temporary folder on
/, deleted after each size), then only the dry run lists them:

    .venv/bin/python bench/scale.py --sizes --s3-size 0 --list-sizes 10000 10000000 --dry-run-only

`--s3-list-size N` runs that dry run once more with the shards (copied there first, not
timed) and `run_dir` in a bucket of the S3 endpoint (moto holds it in memory: 1.5 GB at 10^6).

`--first-part-sizes N ...` starts a real run (`generate.run`, the least work, `FIRST` in a
process of its own joined to one local Ray) on WebDataset shards of N inputs, and watches it
from outside: the seconds to its first committed part (a marker appearing in `_commits/`),
from the process's start and from its call of `generate.run`, and the driver's peak RSS
(`VmHWM`) then and again after `--more-parts` parts more; then the run is killed (also
when no part comes within `--first-part-timeout` seconds: its row says so):

    .venv/bin/python bench/scale.py --sizes --s3-size 0 --first-part-sizes 10000 1000000 --more-parts 5

`--first-part-s3` runs each of those sizes again with `run_dir` in a bucket of the S3
endpoint (the shards on the disk), its markers watched by listing the bucket.

`--noop-rerun-sizes N ...` makes the log a whole run on N inputs leaves (every id committed
through the writer as an error row, `--log-rows` a part, compacted every
`stream.compact_every` parts and at the end, under the fingerprint the job claims), then
times the same command again (`--noop-repeats`, twice by default), each in a process of its own: a rerun with nothing to
do, and the driver's peak RSS. `--noop-rerun-s3` does it again with `run_dir` on the S3
endpoint. No Ray (nothing is streamed). With `--noop-s3-copy` the run folder built on the disk
is copied to the bucket and its log compacted there once, instead of built there commit by
commit (about 150 ms a commit on moto: 100 minutes at 10^7):

    .venv/bin/python bench/scale.py --sizes --s3-size 0 --noop-rerun-sizes 10000 1000000 --noop-rerun-s3
    .venv/bin/python bench/scale.py --sizes --s3-size 0 --noop-rerun-sizes 10000000 --noop-rerun-s3 --noop-s3-copy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_runs import LEAST_WORK, first_parts, noop_rerun, result  # noqa: E402
from scale_scripts import LIST, LOG, READ, RUN  # noqa: E402


def make_shards(folder: Path, n: int, per_shard: int) -> None:
    """`n` samples in tar shards of `per_shard`: one small JPEG (64x64, 692 bytes: at least
    `data.min_side`, so a real run takes it; 1,536 bytes a member with its header and padding)
    per key, as img2dataset writes a shard. Listing never decodes and the keys repeat in every
    shard, so every full shard is the same bytes: made once, written `n / per_shard` times."""
    import io
    import tarfile

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 80, 40)).save(buf, "JPEG", quality=50)
    jpeg = buf.getvalue()
    pad = b"\0" * (-len(jpeg) % tarfile.BLOCKSIZE)

    def member(k: int) -> bytes:
        info = tarfile.TarInfo(f"{k:06d}.jpg")
        info.size = len(jpeg)
        return info.tobuf(format=tarfile.USTAR_FORMAT) + jpeg + pad

    members = [member(k) for k in range(min(per_shard, n))]
    end = b"\0" * 2 * tarfile.BLOCKSIZE
    full = b"".join(members) + end
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(-(-n // per_shard)):
        count = min(per_shard, n - s * per_shard)
        (folder / f"{s:05d}.tar").write_bytes(full if count == len(members) else b"".join(members[:count]) + end)


def listing(size: int, folder: Path | str, run_dir: str, env: dict, modes=("list_inputs", "dry_run")) -> list[dict]:
    """`list_inputs` and the dry run over `folder` (`LIST`), alternated, one process each."""
    rows = []
    for mode in modes:
        done = subprocess.run([sys.executable, "-c", LIST, mode, str(folder), run_dir], capture_output=True,
                              text=True, env=env)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
        assert row["inputs"] == size, row
        row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
        row["load_average"] = os.getloadavg()[0]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows




def existing_reads(uri: str, env: dict, repeats: int = 1) -> list[dict]:
    """`READ` of each kind on a log already there, each in a process of its own (a version
    without `committed_id_array` skips that one); the resume with the checkpoint's `placed`
    flags and without them (every part's files looked for) in turns, `repeats` times."""
    rows = []
    for what in ("array", *["resume", "resume_unflagged"] * repeats, "set"):
        done = subprocess.run([sys.executable, "-c", READ, uri, what], capture_output=True, text=True, env=env)
        if done.returncode and "committed_id_array" in done.stderr:
            continue
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        row = {"store": "S3 endpoint" if "://" in uri else "local disk",
               **json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def log_read(uri: str, markers: int, rows: int, env: dict, build: str) -> dict:
    """The commit log's read before and after compaction (`LOG`), with the per-marker cost."""
    done = subprocess.run([sys.executable, "-c", LOG, uri, str(markers), str(rows), build], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    row = {"store": "S3 endpoint" if "://" in uri else "local disk", **{k: round(v, 3) if isinstance(v, float) else v
                                                                       for k, v in row.items()}}
    if "ms_per_marker_uncompacted" in row:  # one request per marker: what 40,000 markers cost at this rate
        row["read_uncompacted_40000_s"] = round(row["ms_per_marker_uncompacted"] * 40, 1)
    print(json.dumps(row), flush=True)
    return row


def make_inputs(folder: Path, n: int) -> None:
    """`n` distinct 64x64 JPEGs cropped from the shipped photographs."""
    from PIL import Image

    from blipinpaint.config import sample_images_dir

    photos = [Image.open(p).convert("RGB").resize((160, 120)) for p in sorted(sample_images_dir().iterdir())
              if p.suffix.lower() in {".jpg", ".jpeg", ".png"}]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = i // len(photos)
        x, y = k % 96, (k // 96) % 56
        photos[i % len(photos)].crop((x, y, x + 64, y + 64)).save(folder / f"img{i:06d}.jpg", quality=90)


def one_run(overrides: list[str], env: dict) -> dict:
    return result(subprocess.run([sys.executable, "-c", RUN, *overrides], capture_output=True, text=True, env=env))


def parts(run_dir: str, env: dict) -> int:
    code = ("import sys; from blipinpaint.commit_log import CommitLog; "
            "print(len(CommitLog(sys.argv[1] + '/generate').markers()))")
    return int(subprocess.run([sys.executable, "-c", code, run_dir], capture_output=True, text=True, env=env,
                              check=True).stdout)


def measure(size: int, folder: Path, run_dir: str, address: str, env: dict) -> dict:
    overrides = [f"run_dir={run_dir}", f"data.source={folder}", f"ray_address={address}", *LEAST_WORK]
    first = one_run(overrides, env)
    again = one_run(overrides, env)
    assert again["processed"] == 0, again
    row = {"inputs": size, "run_dir": run_dir.split("://")[0] if "://" in run_dir else "local disk",
           "rows_per_s_pipeline": round(size / first["pipeline_s"], 2),
           "rows_per_s_command": round(size / first["wall_s"], 2),
           "list_s": round(first["list_s"], 2), "rss_after_listing_mb": round(first["rss_after_listing_mb"]),
           "driver_peak_rss_mb": round(first["peak_rss_mb"]), "parts": parts(run_dir, env),
           # When the first, the median and the last part were committed, in seconds from the
           # start: parts commit while the stream runs, not in one burst at its end.
           "commits_at_s": [round(t, 1) for t in first["commits_s"]],
           "rerun_nothing_to_do_s": round(again["wall_s"], 2)}
    print(json.dumps(row), flush=True)
    return row


def s3_server(env: dict) -> tuple[subprocess.Popen, dict]:
    """moto's S3 server as a process of its own on a free port; the env that reaches it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    deadline = time.time() + 60
    while True:  # until it answers
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    code = "import boto3; boto3.client('s3').create_bucket(Bucket='scale')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return server, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000], help="sizes on the local disk")
    parser.add_argument("--s3-size", type=int, default=10000, help="0: no bucket run")
    parser.add_argument("--log-markers", type=int, default=0, help="the commit log's read at this many markers "
                        "on the local disk (0: none)")
    parser.add_argument("--s3-log-markers", type=int, default=0, help="the same on the S3 endpoint (0: none)")
    parser.add_argument("--s3-log-build", type=int, default=2000, help="above this many markers the S3 log is "
                        "built and compacted on the disk, then copied to the endpoint (no read before compaction)")
    parser.add_argument("--log-existing", default="", help="a log folder already there (e.g. kept from a "
                        "--log-markers run): each read in a fresh process")
    parser.add_argument("--log-existing-s3", action="store_true", help="--log-existing also on the S3 endpoint")
    parser.add_argument("--list-sizes", type=int, nargs="*", default=[], help="WebDataset sources of these sizes "
                        "listed whole and by a dry run (no Ray)")
    parser.add_argument("--s3-list-size", type=int, default=0, help="the dry run once more at this size, the "
                        "shards and run_dir in a bucket of the S3 endpoint (0: none)")
    parser.add_argument("--dry-run-only", action="store_true", help="--list-sizes by the dry run alone: no "
                        "list_inputs, which holds every input (about 10 GB at 10^7)")
    parser.add_argument("--first-part-sizes", type=int, nargs="*", default=[], help="a real run on WebDataset "
                        "sources of these sizes: time to its first committed part and the driver's peak RSS")
    parser.add_argument("--first-part-s3", action="store_true", help="--first-part-sizes also with run_dir in a "
                        "bucket of the S3 endpoint (the shards on the disk)")
    parser.add_argument("--more-parts", type=int, default=20, help="--first-part-sizes: measured again after "
                        "this many parts more, then the run is killed")
    parser.add_argument("--first-part-timeout", type=float, default=3600, help="--first-part-sizes: a run with "
                        "no committed part after this many seconds is killed, its row saying so")
    parser.add_argument("--noop-rerun-sizes", type=int, nargs="*", default=[], help="WebDataset sources of these "
                        "sizes, every input committed through the writer (as error rows), then the run again: "
                        "nothing to do (no Ray)")
    parser.add_argument("--noop-repeats", type=int, default=2, help="--noop-rerun-sizes: reruns per size and store")
    parser.add_argument("--noop-rerun-s3", action="store_true", help="--noop-rerun-sizes also with run_dir in a "
                        "bucket of the S3 endpoint (the shards on the disk)")
    parser.add_argument("--noop-s3-copy", action="store_true", help="--noop-rerun-s3: the log built on the disk "
                        "copied to the bucket and compacted there, not built there through the writer")
    parser.add_argument("--shard-images", type=int, default=10000, help="images per shard (listing, first part)")
    parser.add_argument("--log-rows", type=int, default=256, help="rows per marker (a part) in the log benches")
    parser.add_argument("--out", default="bench/results/scale.json")
    args = parser.parse_args()

    import ray
    import torch
    from pyarrow import fs as pafs

    from blipinpaint.storage import filesystem
    from rayjobs.cluster import connect

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    server = None
    env = dict(os.environ)
    results = {"command": " ".join(["bench/scale.py", *sys.argv[1:]]),  # as given, the defaults in `args`
               "args": vars(args),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                          f"ray {ray.__version__}",
               "date": date.today().isoformat(), "config": LEAST_WORK, "runs": []}
    try:
        if args.log_existing:
            results["existing_log"] = existing_reads(args.log_existing, env)
            if args.log_existing_s3:
                server, env = s3_server(env)
                os.environ.update(env)  # before the bucket's client is made
                src, root = filesystem(args.log_existing)
                dst, dst_root = filesystem("s3://scale/existing")
                pafs.copy_files(root, dst_root, source_filesystem=src, destination_filesystem=dst, use_threads=True)
                # Compacted there once, as the run writing it there would have: a checkpoint's
                # `placed` flags hold for the folder its compaction listed, not for a copy.
                subprocess.run([sys.executable, "-c", "import sys; from blipinpaint.commit_log import CommitLog; "
                                "CommitLog(sys.argv[1]).compact()", "s3://scale/existing"], env=env, check=True)
                results["existing_log"] += existing_reads("s3://scale/existing", env, repeats=3)
            _write(results, args.out)
            return
        # Before Ray: its workers inherit the endpoint.
        if args.s3_size or args.s3_log_markers or args.s3_list_size or args.noop_rerun_s3 or args.first_part_s3:
            server, env = s3_server(env)
            os.environ.update(env)
        results["commit_log"] = [log_read(uri, n, args.log_rows, env, build) for uri, n, build in (
            (str(work / "log"), args.log_markers, str(work / "log")),
            ("s3://scale/log", args.s3_log_markers, str(work / "s3log")
             if args.s3_log_markers > args.s3_log_build else "s3://scale/log")) if n]
        results["listing"] = []
        for size in args.list_sizes:
            folder = work / f"shards{size}"
            t0 = time.perf_counter()
            make_shards(folder, size, args.shard_images)
            print(f"{size} inputs in shards written in {time.perf_counter() - t0:.0f} s", flush=True)
            modes = ("dry_run",) if args.dry_run_only else ("list_inputs", "dry_run")
            results["listing"] += listing(size, folder, str(work / f"plan{size}"), env, modes)
            shutil.rmtree(folder)
        if args.s3_list_size:  # the shards in a bucket of the endpoint, copied there first (not timed)
            size, folder = args.s3_list_size, work / "s3shards"
            make_shards(folder, size, args.shard_images)
            dst, dst_root = filesystem(f"s3://scale/shards{size}")
            pafs.copy_files(str(folder), dst_root, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=dst, use_threads=True)
            shutil.rmtree(folder)
            rows = listing(size, f"s3://scale/shards{size}", f"s3://scale/plan{size}", env, ("dry_run",))
            results["listing"] += [{**row, "store": "S3 endpoint"} for row in rows]
        results["noop_rerun"] = []
        for size in args.noop_rerun_sizes:
            folder = work / f"shards{size}"
            make_shards(folder, size, args.shard_images)
            on_disk = noop_rerun(size, folder, str(work / f"noop{size}"), env, args.log_rows, args.noop_repeats)
            results["noop_rerun"] += on_disk
            if args.noop_rerun_s3:
                copied = {**on_disk[0], "run_dir": str(work / f"noop{size}")} if args.noop_s3_copy else None
                results["noop_rerun"] += noop_rerun(size, folder, f"s3://scale/noop{size}", env, args.log_rows,
                                                    args.noop_repeats, copied)
            shutil.rmtree(folder)
        if not args.sizes and not args.s3_size and not args.first_part_sizes:  # the log and listing alone: no Ray
            _write(results, args.out)
            return
        connect()
        env = dict(os.environ)  # with what `connect` set for joining this Ray (its auth token)
        address = ray.get_runtime_context().gcs_address
        results["first_parts"] = []
        for size in args.first_part_sizes:
            folder = work / f"shards{size}"
            make_shards(folder, size, args.shard_images)
            results["first_parts"].append(first_parts(size, folder, str(work / f"first{size}"), address, env,
                                                      args.more_parts, args.first_part_timeout,
                                                      work / f"first{size}.log"))
            if args.first_part_s3:
                results["first_parts"].append(first_parts(size, folder, f"s3://scale/first{size}", address, env,
                                                          args.more_parts, args.first_part_timeout,
                                                          work / f"first{size}-s3.log"))
            shutil.rmtree(folder)
        for size in sorted({*args.sizes, *([args.s3_size] if args.s3_size else [])}):
            folder = work / f"in{size}"
            make_inputs(folder, size)
            if size in args.sizes:
                results["runs"].append(measure(size, folder, str(work / f"run{size}"), address, env))
            if size == args.s3_size:
                results["runs"].append(measure(size, folder, f"s3://scale/run{size}", address, env))
            shutil.rmtree(folder)
    finally:
        ray.shutdown()
        if server is not None:
            server.terminate()
        shutil.rmtree(work, ignore_errors=True)
    local = [r for r in results["runs"] if r["run_dir"] == "local disk"]
    if len(local) >= 2:
        results["rate_ratio_largest_to_smallest"] = round(local[-1]["rows_per_s_pipeline"]
                                                          / local[0]["rows_per_s_pipeline"], 3)
    _write(results, args.out)


def _write(results: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
