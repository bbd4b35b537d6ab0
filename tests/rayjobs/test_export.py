"""The export job (issue 33): the session's main run as a Hugging Face dataset folder and as
WebDataset shards, read back with `datasets` and `webdataset`, from a bucket; a kill and a
rerun; and the runs it refuses. The audit of that bucket run is here too (both jobs on the
S3 endpoint)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from helpers import account, copy_run, download, end_actors_of_dead_drivers, print_figures
from PIL import Image
from pyarrow import fs as pafs

from blipinpaint.commit_log import CommitLog
from blipinpaint.config import load_config
from blipinpaint.fingerprint import digest_of
from blipinpaint.reader import split_reads
from blipinpaint.storage import filesystem, folder_digest, read_text
from rayjobs import audit, export

SHARDS = ["heldout-00000-of-00001", "train-00000-of-00002", "train-00001-of-00002"]  # 6 samples, 2 a shard


def _generated(run_dir) -> dict[str, dict]:
    """Generate's committed rows of a local run, by id."""
    return {r["id"]: r for r in pq.read_table(Path(run_dir) / "generate" / "samples").to_pylist()}


@pytest.fixture(scope="module")
def bucket_run(main_run, s3):
    """The main run's generate folder, copied into a bucket as a cluster would have written it."""
    code, folder, _ = main_run
    assert code == 0
    run_dir = f"{s3('export-audit')}/run"
    fs, path = filesystem(run_dir)
    pafs.copy_files(str(folder / "run" / "generate"), f"{path}/generate", destination_filesystem=fs)
    return run_dir


@pytest.fixture(scope="module")
def bucket_export(bucket_run, local_ray):
    """The bucket run exported into the bucket (two samples a shard), then downloaded."""
    stats = export.run(load_config(overrides=[f"run_dir={bucket_run}", "export.rows_per_shard=2"]))
    return stats, Path(download(f"{bucket_run}/export"))


def test_datasets_and_webdataset_read_every_sample_of_the_export(main_run, bucket_export, tmp_path):
    stats, out = bucket_export
    run_dir = main_run[1] / "run"
    generated = _generated(run_dir)
    train, heldout = split_reads(load_config(overrides=[f"run_dir={run_dir}"]))
    splits = {name: sorted(i for r in reads for i in r["ids"])
              for name, reads in (("train", train), ("heldout", heldout))}
    assert stats["samples"] == len(generated) == 6 and stats["shards"] == 3
    assert {s: v["samples"] for s, v in stats["splits"].items()} == {s: len(ids) for s, ids in splits.items()}

    # Hugging Face `datasets`: the folder's card names the splits, the images decode to PIL images.
    loaded = datasets.load_dataset(str(out / "hf"), cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(loaded) == ["heldout", "train"]
    for split, ids in splits.items():
        rows = list(loaded[split])
        assert sorted(r["id"] for r in rows) == ids
        for row in rows:
            made = generated[row["id"]]
            assert all(isinstance(row[n], Image.Image) and row[n].size == (64, 64)
                       for n in ("image", "mask", "inpainted", "inpainted_baseline"))
            assert row["caption"] == made["caption"] and row["psnr"] == pytest.approx(made["psnr"])
            assert row["inpainter_model"] == made["inpainter_model"]
    # The packaged Parquet loader finds the same splits by the files' names alone.
    by_name = datasets.load_dataset("parquet", data_dir=str(out / "hf"), cache_dir=str(tmp_path / "parquet-cache"))
    assert {split: sorted(by_name[split]["id"]) for split in by_name} == splits
    assert isinstance(by_name["heldout"][0]["mask"], Image.Image)
    # What made it: the card holds generate's fingerprint, the models' digests, the samples' licences.
    fingerprint = json.loads((run_dir / "generate" / "fingerprint.json").read_text())
    card = (out / "hf" / "README.md").read_text()
    assert card.startswith("---\n") and digest_of(fingerprint) in card
    assert all(d in card for d in fingerprint["model_digests"].values())
    assert "| chelsea.jpg | Chelsea the cat, by Stefan van der Walt | CC0 |" in card  # the source's SOURCES.md
    assert "0 inputs of the run became error rows" in card
    folder_digest(str(out / "hf"))  # every file is the one its manifest lists (raises otherwise)

    # `webdataset`: every sample once, its members decoded, the split and scores in its JSON.
    index = json.loads((out / "webdataset" / "index.json").read_text())
    assert index["made_by"]["generate_fingerprint"] == digest_of(fingerprint)
    urls = [str(out / "webdataset" / s["url"]) for s in index["shards"]]
    assert sorted(s["url"] for s in index["shards"]) == [f"{name}.tar" for name in SHARDS]
    seen = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(seen) == len({s["__key__"] for s in seen}) == 6
    assert sorted(s["json"]["id"] for s in seen) == sorted(generated)
    for sample in seen:
        assert sample["txt"] == generated[sample["json"]["id"]]["caption"]
        assert sample["json"]["id"] in splits[sample["json"]["split"]]
        assert isinstance(sample["inpainted_baseline.png"], Image.Image)
    assert {split: s["samples"] for split, s in index["splits"].items()} == {s: len(i) for s, i in splits.items()}
    folder_digest(str(out / "webdataset"))


def test_an_export_killed_mid_way_and_run_again_writes_the_same_files(main_run, bucket_export, local_ray, tmp_path):
    """The driver is killed while the held-out shard's tar is half written (the task writing it
    kills it, `export.inject_kill`); the same command again writes what was not committed, and
    the files are those of the export that was never interrupted (the bucket's)."""
    copy_run(main_run[1] / "run", tmp_path, ("generate",))
    args = [f"run_dir={tmp_path}", "export.rows_per_shard=2"]
    started = time.perf_counter()
    # The held-out shard is the plan's last: the train shards' tasks take the CPUs first, and
    # it starts when one of them has committed, so the kill lands with work on both sides.
    killed = subprocess.Popen([sys.executable, "-m", "rayjobs.export", *args, f"export.inject_kill={SHARDS[0]}",
                               f"ray_address={local_ray.get_runtime_context().gcs_address}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, stderr[-3000:]
    end_actors_of_dead_drivers(local_ray, killed.pid)
    out = tmp_path / "export"
    assert (out / "_staging" / "shards" / f"{SHARDS[0]}.tar").is_file()  # cut mid-write
    assert not (out / "_SUCCESS").exists() and not (out / "hf" / "README.md").exists()
    committed_before = len(CommitLog(str(out)).markers())
    assert 1 <= committed_before < 3

    stats = export.run(load_config(overrides=args))
    # Only what was not committed (a write of the killed run landing before the take-over counts as done).
    assert 1 <= stats["this_run"]["shards_written"] <= 3 - committed_before
    clean = bucket_export[1]
    files = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file() and p.parts[len(clean.parts)] in
                   ("hf", "webdataset"))
    assert files and files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()
                                     and p.parts[len(out.parts)] in ("hf", "webdataset"))
    different = [str(f) for f in files if (clean / f).read_bytes() != (out / f).read_bytes()]
    assert different == []
    # Every sample in the export's commit log once, nothing staged left behind, the folder finished.
    figures = account(out, _generated(tmp_path))
    print_figures("export: the driver killed with the held-out shard's tar half written, then the same command",
                  figures, time.perf_counter() - started, shards_committed_before=committed_before,
                  shards_written_by_rerun=stats["this_run"]["shards_written"])
    assert (figures["committed"], figures["lost"], figures["duplicated"], figures["orphans"]) == (6, 0, 0, 0)
    assert json.loads((out / "_SUCCESS").read_text()) == stats["fingerprint"]


def test_the_bucket_run_audits(bucket_run, local_ray, capsys):
    """The audit reads a run in a bucket, recomputes a sample of its rows and writes its report there."""
    code = audit.main([f"run_dir={bucket_run}", "audit.size=2", "audit.seed=3",
                       f"ray_address={local_ray.get_runtime_context().gcs_address}"])
    said = capsys.readouterr().out
    assert code == 0, said
    report = json.loads(read_text(f"{bucket_run}/audit/report.json"))
    assert (report["rows"], report["held"], report["failed"]) == (2, 2, [])
    assert "2 of 2 rows held" in said and "the run held" in said


def _write(path: Path, text: str) -> None:
    path.write_text(text)


@pytest.mark.parametrize("job", [export, audit])
def test_a_run_that_did_not_finish_or_was_made_otherwise_is_refused(main_run, tmp_path, capsys, job):
    """Before any work: a generate folder without `_SUCCESS`, one claimed again after it finished,
    a command of other settings; and an export folder of another export's settings."""
    copy_run(main_run[1] / "run", tmp_path, ("generate",))
    generated = tmp_path / "generate"
    finished = (generated / "_SUCCESS").read_text()

    def refused(*extra) -> str:
        assert job.main([f"run_dir={tmp_path}", *extra]) == 2
        return capsys.readouterr().err

    (generated / "_SUCCESS").unlink()
    assert f"{generated} is not complete (no _SUCCESS)" in refused()
    _write(generated / "_SUCCESS", finished.replace('"seed": 0', '"seed": 5'))
    assert "finished under another fingerprint than the one it holds now (seed differ" in refused()
    _write(generated / "_SUCCESS", finished)
    assert "holds rows generated with other settings than this command's (masks.kind differ)" in refused(
        "masks.kind=thin")
    if job is export:
        (tmp_path / "export").mkdir()
        _write(tmp_path / "export" / "fingerprint.json", json.dumps({"export.rows_per_shard": 7}))
        said = refused()
        assert "holds the export step's output of other settings or inputs (" in said and "restart=[export]" in said
        shutil.rmtree(tmp_path / "export")
    assert not (tmp_path / "export").exists() and not (tmp_path / "audit").exists()  # nothing was written
