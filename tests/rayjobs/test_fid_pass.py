"""The FID pass's stage, run in this process on a small committed part; its retry limit, in a job."""

import os
import subprocess
import sys
import time

import numpy as np
from helpers import PIPELINE_ARGS, copy_run, encode, photo, print_figures

from blipinpaint.commit_log import CommitLog
from blipinpaint.config import load_config
from blipinpaint.evaluation import FID_SETS
from rayjobs import evaluate
from rayjobs.fid_pass import FidStage
from rayjobs.stream import TASK_RETRIES, attempt_ledger


def test_a_fid_actor_reads_its_part_and_runs_the_network_in_batches_of_the_configured_size(local_ray, cfg, tmp_path,
                                                                                            monkeypatch):
    """`evaluate.fid.batch_size` bounds a FID actor's memory: the network sees at most that
    many rows at a time, and every row of the part once, in id order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"s{i}", "mask_area": 0.2, **{c: encode(photo(64, 64, seed=i), "PNG") for c in FID_SETS.values()}}
            for i in (3, 0, 4, 1, 2)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part.parquet")
    cfg = load_config(overrides=[f"run_dir={cfg.run_dir}", "evaluate.fid.batch_size=2"])
    with attempt_ledger() as ledger:  # the run's ledger: counts the starts of each part
        stage = FidStage(cfg, FID_SETS, ledger)
        sizes, net = [], stage.features.net
        monkeypatch.setattr(stage.features, "net", lambda images: (sizes.append(len(images)), net(images))[1])
        out = stage({"path": [str(tmp_path / "part.parquet")], "ids": [["s0", "s1", "s2", "s3"]]})  # s4: not asked
    assert sizes == [2, 2] * len(FID_SETS)
    assert list(out["id"]) == ["s0", "s1", "s2", "s3"]
    assert {name: out[name].shape[0] for name in FID_SETS} == {name: 4 for name in FID_SETS}
    assert np.allclose(out["mask_area"], 0.2)


def test_a_part_that_kills_its_fid_worker_every_time_ends_the_job_with_one_line(main_run, local_ray, tmp_path):
    """A FID worker that dies on the same part at every start (a crash, not a lost node): the
    pool restarts it and the part is sent again, until the attempt ledger has counted
    `TASK_RETRIES + 1` deaths; then the job stops with one line naming the part, exit 1, no
    traceback and no report. The evaluated rows (copied, all committed) are left as they were."""
    copy_run(main_run[1] / "run", tmp_path, ("generate", "scorer", "finetune", "blip", "eval"))
    for done in ("report.json", "_SUCCESS"):  # only the FID pass and the report left to do
        (tmp_path / "eval" / done).unlink()
    args = [*PIPELINE_ARGS, f"run_dir={tmp_path}"]
    ids = evaluate.evaluation_ids(load_config(overrides=args))
    committed = sorted(CommitLog(str(tmp_path / "eval")).committed_ids())
    assert committed == sorted(ids)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rayjobs.evaluate", *args, "stream.inject_failure.stage=fid",
                           f"stream.inject_failure.id={ids[0]}", "stream.inject_failure.exit=true",
                           f"ray_address={local_ray.get_runtime_context().gcs_address}"],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    print_figures("evaluate, a FID worker dying on one part at every start", {"samples": len(ids)},
                  time.perf_counter() - started)
    assert done.returncode == 1, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("evaluate: ")]
    assert len(said) == 1 and said[0].startswith("evaluate: the FID workers died on "), done.stderr[-3000:]
    assert said[0].split(" times;")[0].endswith(f" {TASK_RETRIES + 1}")  # every retry spent, then no more
    assert ".parquet" in said[0] and "the same command again" in said[0]  # names the part, says what to do
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "eval" / "report.json").exists() and not (tmp_path / "eval" / "_SUCCESS").exists()
    assert sorted(CommitLog(str(tmp_path / "eval")).committed_ids()) == committed
