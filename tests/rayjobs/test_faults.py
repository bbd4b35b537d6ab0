"""Fault injection: the generate job under crashed workers, failing stages, a killed driver,
interrupted writes and a model that cannot load. Each case prints its figures (`FIGURES ...`),
which RELIABILITY.md reports."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import account, encode, end_actors_of_dead_drivers, photo, print_figures
from pyarrow import fs as pafs

from blipinpaint.commit_log import CommitLog
from blipinpaint.config import load_config, sample_images_dir
from blipinpaint.storage import filesystem
from rayjobs import generate


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Eight usable photographs: the six shipped ones and two made here."""
    root = tmp_path_factory.mktemp("photos")
    for path in sample_images_dir().iterdir():
        if path.suffix in (".jpg", ".png"):
            shutil.copy(path, root / path.name)
    for seed in (1, 2):
        (root / f"made-{seed}.png").write_bytes(encode(photo(120, 90, seed=seed), "PNG"))
    return root


def _ids(source):
    return sorted(p.name for p in source.iterdir())


def _args(run_dir, source, *extra):
    # Small batches: several batches in flight, so a fault lands mid-run with work on both sides.
    return [f"run_dir={run_dir}", f"data.source={source}", "stream.rows_per_file=2", "stream.read.batch_size=2",
            "stream.captioner.batch_size=2", "stream.inpainter.batch_size=1", "stream.metrics.batch_size=2",
            *extra]


def _run(case, source, run_dir, *extra):
    started = time.perf_counter()
    stats = generate.run(load_config(overrides=_args(run_dir, source, *extra)))
    figures = account(run_dir / "generate", _ids(source))
    print_figures(case, figures, time.perf_counter() - started)
    return stats, figures


def _errors(run_dir):
    table = pq.read_table(run_dir / "generate" / "errors")
    return dict(zip(table.column("id").to_pylist(), table.column("error").to_pylist()))


def test_a_stage_raising_on_one_batch_makes_that_batch_error_rows(local_ray, source, tmp_path):
    """A stage raising on every attempt of one batch: that batch becomes error rows. The same
    command with `stream.retry_failed=true` does them again, and the inpainter's process
    exits while it holds the victim's batch: Ray restarts it and the batch is retried."""
    victim = _ids(source)[2]
    stats, figures = _run("captioner raises on one batch", source, tmp_path,
                          "stream.inject_failure.stage=captioner", f"stream.inject_failure.id={victim}")
    errors = _errors(tmp_path)
    assert victim in errors and 1 <= len(errors) <= 2  # the batch of two (or one) that held it
    assert set(errors.values()) == {f"stage failed: captioner raised RuntimeError: injected failure on {victim!r}"}
    assert stats["stages"]["captioner"]["retries"] == 2  # the configured stream.batch_retries, no more
    assert (figures["committed"], figures["lost"], figures["duplicated"], figures["orphans"]) == (8, 0, 0, 0)
    assert stats["ok"] == 8 - len(errors)

    # What a user does once the cause is gone: the same command, asking for failed batches again.
    stats, figures = _run("the same command with stream.retry_failed=true; the inpainter process exits on "
                          "the victim once", source, tmp_path, "stream.retry_failed=true",
                          "stream.inject_failure.stage=inpainter", f"stream.inject_failure.id={victim}",
                          "stream.inject_failure.exit=true", "stream.inject_failure.times=1")
    assert stats["this_run"]["retried_failed"] == len(errors) == stats["this_run"]["processed"]
    assert stats["ok"] == 8 and stats["errors"] == 0 and not list((tmp_path / "generate" / "errors").iterdir())
    assert (figures["committed"], figures["lost"], figures["duplicated"], figures["orphans"]) == (8, 0, 0, 0)
    # One death, on one batch, retried (the captioner's retries went with the error rows they made).
    assert stats["stages"]["inpainter"]["retries"] == 1 and stats["retries"] == 1


@pytest.mark.parametrize("stage, batch", [("inpainter", 1), ("prepare", 2)])
def test_a_batch_that_kills_its_worker_every_time_becomes_error_rows(local_ray, source, tmp_path, stage, batch):
    """A poison batch (its worker dies on it, every time) ends after the bounded retries: no hang.
    For a model stage Ray restarts the actor and retries the batch; for a read task (a decoder
    crash, the OOM killer) Ray retries the task without limit. The run's ledger counts the
    starts either way, and after `stream.batch_retries` deaths the batch becomes error rows.

    A separate driver with a deadline, so a hang fails the test instead of stalling the suite."""
    victim = _ids(source)[5]
    args = _args(tmp_path, source, f"stream.inject_failure.stage={stage}", f"stream.inject_failure.id={victim}",
                 "stream.inject_failure.exit=true", f"ray_address={local_ray.get_runtime_context().gcs_address}")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rayjobs.generate", *args], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    figures = account(tmp_path / "generate", _ids(source))
    print_figures(f"the {stage} process dies on every try of one batch", figures, time.perf_counter() - started)
    errors = _errors(tmp_path)
    assert victim in errors and len(errors) <= batch  # the batch (of `batch` rows at most) that held it
    assert set(errors.values()) == {f"stage failed: {stage} worker died on this batch 3 times"}
    assert (figures["committed"], figures["lost"], figures["duplicated"], figures["orphans"]) == (8, 0, 0, 0)
    assert figures["retries"] == 3
    # Its worker died, its node did not: said so, and its pool's actor restarted as often. (A
    # batch that had finished on that actor may run again too, its output gone with the process.)
    stats = json.loads((tmp_path / "generate" / "stats.json").read_text())
    assert {cause: stats["reruns"][stage][cause] for cause in ("raised", "worker_died", "node_lost")} == {
        "raised": 0, "worker_died": 3, "node_lost": 0}
    assert set(stats["reruns"]) == {stage}
    assert stats["this_run"]["restarts"] == ({"inpainter": {"worker_died": 3}} if stage == "inpainter" else {})


def test_the_same_command_again_takes_the_folder_over_and_does_the_rest_once(local_ray, source, s3):
    """A job still running (or its driver killed, its actors alive) when the same command runs
    again, right after its first commit: the new run takes the folder over, skips what was
    committed and does the rest; the first job commits nothing more and says why. With
    `run_dir` in a bucket, as on a cluster: the writer's disk semantics are tested on both
    (tests/test_writer.py), the job's own take-over here on the store it meets there."""
    run_dir = f"{s3('take-over')}/run"
    # One row at a time through every stage, the stages taking every CPU (as on a cluster):
    # parts commit while later rows are still being inpainted, not all in one burst at the end.
    args = _args(run_dir, source, "stream.rows_per_file=1", "stream.read.batch_size=1",
                 "stream.captioner.batch_size=1", "stream.metrics.batch_size=1")
    old = subprocess.Popen([sys.executable, "-m", "rayjobs.generate", *args,
                            f"ray_address={local_ray.get_runtime_context().gcs_address}"],
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=os.environ.copy())
    started, out = time.perf_counter(), f"{run_dir}/generate"
    fs, root = filesystem(out)

    def listed(folder: str) -> dict:  # a bucket has no "folder" until something is written under it
        return {i.base_name: i.mtime for i in fs.get_file_info(pafs.FileSelector(f"{root}/{folder}",
                                                                                  allow_not_found=True))}

    def published() -> dict:
        """The samples files whose move has finished. A marker is written before its files are
        moved, and a move on S3 is a copy then a delete: a file whose staged copy is still there
        is copied again by the take-over's recovery (same bytes, new mtime), as it should be."""
        staged, names = listed("_staging/samples"), listed("samples")
        done = {f"{m['name']}.parquet" for m in CommitLog(out).markers() if m["staged"].get("samples") not in staged}
        return {name: mtime for name, mtime in names.items() if name in done}

    try:
        deadline = time.time() + 240
        while time.time() < deadline and not published():
            assert old.poll() is None, "the job ended before the same command ran again"
            time.sleep(0.1)
        before = published()
        committed_before = len(CommitLog(out).committed_ids())
        stats = generate.run(load_config(overrides=args))
        _, stderr = old.communicate(timeout=240)
    finally:
        if old.poll() is None:
            os.killpg(old.pid, signal.SIGKILL)
            old.wait()
        end_actors_of_dead_drivers(local_ray, old.pid)  # the next tests need the CPUs
    figures = account(out, _ids(source))
    print_figures("the same command again while the first job runs, after its first commit", figures,
                  time.perf_counter() - started, committed_before=committed_before,
                  done_by_rerun=stats["this_run"]["processed"], first_job_exit_code=old.returncode)
    assert old.returncode == 1
    said = [line for line in stderr.splitlines() if line.startswith("generate: ")]
    assert said == [f"generate: {out} is now written by another run; this run's writes stop here"], stderr[-2000:]
    assert 1 <= stats["this_run"]["processed"] <= 8 - committed_before  # it resumed, and redid nothing
    # Nothing lost, nothing twice, and the first job's commits after the take-over were refused.
    assert (figures["committed"], figures["lost"], figures["duplicated"], figures["orphans"]) == (8, 0, 0, 0)
    after = listed("samples")
    assert before and all(after[name] == mtime for name, mtime in before.items())  # finished work is not rewritten
    assert fs.get_file_info(f"{root}/_SUCCESS").type == pafs.FileType.File


WRITER = textwrap.dedent("""
    import os
    import sys
    import numpy as np
    import pyarrow as pa
    from blipinpaint import commit_log
    from blipinpaint.commit_log import CommitLog

    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("mask_png", pa.binary())])
    out, round_ = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(round_)
    if round_ == 0:  # die in the third part's write, its staged file left behind: half written on a
        real, calls = commit_log.pq.write_table, []  # disk, as a kill can leave it (a PUT is whole or absent)

        def half_then_die(table, where, filesystem):
            real(table, where, filesystem=filesystem)
            calls.append(where)
            if len(calls) == 3:
                if "://" not in out:
                    os.truncate(where, os.path.getsize(where) // 2)
                os._exit(1)

        commit_log.pq.write_table = half_then_die
    print("ready", flush=True)
    for part in range(1000):
        ids = [f"r{round_}-p{part}-{i}" for i in range(50)]
        # Incompressible bytes: each part is 1 MB, so the write takes long enough to be interrupted.
        blobs = [rng.bytes(20_000) for _ in ids]
        CommitLog(out, schema).commit(pa.table({"id": ids, "source": ids, "error": [""] * len(ids), "mask_png": blobs}))
""")


@pytest.mark.parametrize("store", ["disk", "bucket"])
def test_an_interrupted_parquet_write_is_never_read_as_data(store, tmp_path, s3):
    """A writer that dies leaving a staged file (half written on a disk), then killed at random
    points again and again, on a disk and in a bucket (where a move is a copy and a delete):
    readers of `samples/` only ever see whole committed parts, and `recover()` finishes or
    undoes the part it was writing."""
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("mask_png", pa.binary())])
    out = str(tmp_path / "out") if store == "disk" else f"{s3(f'killed-writer-{uuid.uuid4().hex[:8]}')}/out"
    fs, root = filesystem(out)

    def ids_seen() -> list[str]:
        """What a reader of `samples/` finds: every Parquet file there."""
        files = fs.get_file_info(pafs.FileSelector(f"{root}/samples", allow_not_found=True))
        return [i for f in files if f.path.endswith(".parquet")
                for i in pq.read_table(f.path, columns=["id"], filesystem=fs).column("id").to_pylist()]

    rng, started, rounds, orphans = random.Random(0), time.perf_counter(), 8, 0
    for round_ in range(rounds):
        markers = len(CommitLog(out, schema).markers())
        writer = subprocess.Popen([sys.executable, "-c", WRITER, out, str(round_)], stdout=subprocess.PIPE)
        assert writer.stdout.readline() == b"ready\n"
        # This round's first commit, however slow the machine: then a kill somewhere in the
        # next parts, in a write or between two. Round 0's writer is left to die on its own,
        # in its third part's write: a staged file no marker names, whatever the machine's pace.
        deadline = time.time() + 120
        while writer.poll() is None and len(CommitLog(out, schema).markers()) <= markers:
            assert time.time() < deadline, "the writer committed nothing in 120 s"
            time.sleep(0.01)
        if round_:
            time.sleep(rng.random() * 0.3)
            writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=120) != 0
        log = CommitLog(out, schema)
        committed = log.committed_ids()
        # What a reader sees before any recovery: whole parts, each one committed.
        seen = ids_seen()
        assert set(seen) <= committed and len(seen) == len(set(seen))
        orphans += log.recover()["orphans_removed"]
        seen = ids_seen()  # after recovery: every committed row, once
        assert committed <= set(seen) <= log.committed_ids() and len(seen) == len(set(seen))
    # A request the killed writer had sent may still land after its death (an S3 server
    # finishes what it received): the next recovery finishes or undoes its part, as here.
    orphans += CommitLog(out, schema).recover()["orphans_removed"]
    committed = CommitLog(out, schema).committed_ids()
    assert sorted(ids_seen()) == sorted(committed)
    figures = account(out, committed)
    print_figures(f"Parquet writer killed at random points ({store})", figures, time.perf_counter() - started,
                  kills=rounds, orphans_removed_by_recover=orphans)
    assert (figures["lost"], figures["duplicated"], figures["orphans"]) == (0, 0, 0)
    assert orphans >= 1  # the half-written file, at least


def test_a_model_that_cannot_load_fails_the_job_fast_with_the_reason(local_ray, source, tmp_path):
    empty = tmp_path / "no-model-here"
    empty.mkdir()
    args = _args(tmp_path, source, f"models.inpainter.name_or_path={empty}",
                 f"ray_address={local_ray.get_runtime_context().gcs_address}")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rayjobs.generate", *args], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    wall = time.perf_counter() - started
    figures = account(tmp_path / "generate", _ids(source))
    print_figures("inpainter model path is an empty folder", figures, wall, exit_code=done.returncode)
    assert done.returncode == 1
    said = [line for line in done.stderr.splitlines() if line.startswith("generate: ")]
    assert len(said) == 1 and said[0].startswith("generate: the inpainter stage cannot start: OSError:"), said
    assert str(empty) in said[0]
    assert not (tmp_path / "generate" / "_SUCCESS").exists()  # (restarts until a timeout would fail the run above)
