"""The generate job on a local Ray (127.0.0.1) with the tiny models."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import account, await_no_live_actors, encode, photo, print_figures

from blipinpaint.config import load_config, sample_images_dir
from blipinpaint.errors import ConfigError
from blipinpaint.records import ERROR_SCHEMA, METRIC_COLUMNS, SAMPLE_SCHEMA
from rayjobs import generate

BAD = {"notes.jpg": "not an image", "empty.png": "empty file", "sub/cut.jpg": "corrupt image",
       "dot.png": "too small"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Five shipped photographs and four unusable files."""
    root = tmp_path_factory.mktemp("images")
    for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "coins.png", "rocket.jpg"):
        shutil.copy(sample_images_dir() / name, root / name)
    (root / "sub").mkdir()
    (root / "notes.jpg").write_text("not a picture")
    (root / "empty.png").write_bytes(b"")
    jpeg = encode(photo(), "JPEG")
    (root / "sub" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dot.png").write_bytes(encode(photo(1, 1), "PNG"))
    return root


def _cfg(run_dir, source, *extra):
    return load_config(overrides=[f"run_dir={run_dir}", f"data.source={source}", "stream.rows_per_file=3",
                                  "stream.read.batch_size=3", *extra])


def _tables(run_dir):
    out = run_dir / "generate"
    return pq.read_table(out / "samples").sort_by("id"), pq.read_table(out / "errors").sort_by("id")


@pytest.fixture(scope="module")
def first_run(local_ray, source, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gen")
    # An autoscaling captioner pool (min/max) next to fixed ones.
    cfg = _cfg(run_dir, source, "stream.captioner.min_size=1", "stream.captioner.max_size=2", "masks.kind=mixed")
    return run_dir, cfg, generate.run(cfg)


def test_every_input_once_in_samples_or_errors(first_run):
    run_dir, _, stats = first_run
    # The run ended its attempt ledger: a driver that runs job after job (a notebook, the pipeline) keeps none.
    await_no_live_actors("AttemptLedger")
    samples, errors = _tables(run_dir)
    assert samples.schema.names == SAMPLE_SCHEMA.names and errors.schema == ERROR_SCHEMA
    assert samples.column("id").to_pylist() == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "coins.png",
                                               "rocket.jpg"]
    reasons = {i: e.split(":")[0] for i, e in zip(errors.column("id").to_pylist(), errors.column("error").to_pylist())}
    assert reasons == BAD
    assert (stats["inputs"], stats["ok"], stats["errors"], stats["missing"], stats["duplicates"]) == (9, 5, 4, 0, 0)
    assert stats["errors_by_reason"] == {"corrupt image": 1, "empty file": 1, "not an image": 1, "too small": 1}
    assert set(stats["stages"]) == {"prepare", "captioner", "inpainter", "metrics"}
    assert all(s["rows_per_s_per_worker"] > 0 for s in stats["stages"].values())
    assert (run_dir / "generate" / "_SUCCESS").exists() and (run_dir / "generate" / "config.yaml").exists()
    # Several committed parts: errors are committed where they fail, apart from the samples.
    parts = [p for d in ("samples", "errors") for p in (run_dir / "generate" / d).glob("*.parquet")]
    assert len(parts) >= 2
    for m in METRIC_COLUMNS:
        assert samples.column(m).null_count == 0


def test_rerun_skips_committed_work(first_run):
    run_dir, cfg, _ = first_run
    before = sorted(p.name for p in (run_dir / "generate" / "samples").iterdir())
    stats = generate.run(cfg)
    assert stats["this_run"]["processed"] == 0 and stats["this_run"]["skipped_committed"] == 9
    assert sorted(p.name for p in (run_dir / "generate" / "samples").iterdir()) == before


def test_same_config_same_rows_and_a_manifests_bad_entries(first_run, source, tmp_path):
    """A second run, fed the same files through a Parquet manifest, gives identical rows; the
    manifest's own bad entries (a repeated id, a missing file, paths out of the root, a NUL)
    become error rows, and every entry is accounted for once."""
    run_dir, cfg, _ = first_run
    names = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    (tmp_path / "secret.png").write_bytes(encode(photo(seed=4), "PNG"))  # outside the root
    bad = {"coins.png": "coins.png", "coins.png#2": "coins.png", "gone": "missing.png", "escape": "../secret.png",
           "absolute": str(tmp_path / "secret.png"), "nul": "coins\x00.png"}
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"id": names + list(bad), "path": names + list(bad.values())}), manifest)
    stats = generate.run(_cfg(tmp_path / "run", manifest, f"data.image_root={source}", "masks.kind=mixed"))
    run_dir_b = tmp_path / "run"
    (a, _), (b, errors_b) = _tables(run_dir), _tables(run_dir_b)
    figures = account(run_dir_b / "generate", names + ["coins.png#3", *list(bad)[1:]])
    print_figures("bad-input matrix, manifest", figures, stats["this_run"]["wall_s"], samples=stats["ok"],
                  errors=stats["errors"])
    assert (figures["committed"], figures["lost"], figures["duplicated"], figures["orphans"]) == (15, 0, 0, 0)
    outcomes = dict(zip(errors_b.column("id").to_pylist(), errors_b.column("error").to_pylist()))
    for name in ("coins.png#3", "gone", "escape", "absolute", "nul"):
        print(f"\nINPUT manifest {name}: {outcomes[name]}")
    # The repeated id keeps a row of its own under a suffix that collides with no other id.
    assert {i: outcomes[i].split(":")[0] for i in ("coins.png#3", "gone", "escape", "absolute", "nul")} == {
        "coins.png#3": "duplicate id", "gone": "read failed", "escape": "bad path", "absolute": "bad path",
        "nul": "bad path"}
    assert outcomes["coins.png#3"] == f"duplicate id: 'coins.png' repeats in {manifest}"
    assert "missing.png" in outcomes["gone"] and "coins.png#2" in b.column("id").to_pylist()
    assert (stats["inputs"], stats["missing"], stats["duplicates"]) == (15, 0, 0)

    b = b.filter(pc.is_in(b.column("id"), value_set=a.column("id")))
    for column in ("id", "caption", "mask_kind", "mask_png", "noise_seed"):
        assert a.column(column).to_pylist() == b.column(column).to_pylist(), column
    # Model outputs to float precision: how rows meet in a batch differs from run to run, and
    # batched CPU kernels are not bitwise invariant to the batch's size.
    for column in ("caption_features", *METRIC_COLUMNS):
        np.testing.assert_allclose(np.array(a.column(column).to_pylist(), dtype=np.float64),
                                   np.array(b.column(column).to_pylist(), dtype=np.float64), rtol=1e-4, atol=1e-5,
                                   err_msg=column)


def test_changed_settings_do_not_mix_into_a_run(first_run, source):
    run_dir, _, _ = first_run
    with pytest.raises(ConfigError, match="seed"):
        generate.run(_cfg(run_dir, source, "seed=1", "masks.kind=mixed"))


def test_a_failing_prepare_commits_each_bad_row_once(tmp_path, monkeypatch):
    """A decode error found before the batch failed must not be committed again with the batch."""
    def broken_masker(cfg):
        def mask(batch):
            raise RuntimeError("mask bug")
        return mask

    monkeypatch.setattr(generate.builders, "build_masker", broken_masker)
    good, empty = tmp_path / "good.png", tmp_path / "empty.png"
    good.write_bytes(encode(photo(), "PNG"))
    empty.write_bytes(b"")
    sunk = []
    batch = {"id": np.array(["empty.png", "good.png"], dtype=object), "error": np.array(["", ""], dtype=object),
             "source": np.array([str(empty), str(good)], dtype=object), "raw_path": np.array([b"", b""], dtype=object)}
    out = generate.prepare(batch, load_config(overrides=[f"run_dir={tmp_path}", "stream.batch_retries=1"]),
                           sunk.append)
    assert len(out["id"]) == 0
    committed = [i for rows in sunk for i in rows["id"]]
    assert sorted(committed) == ["empty.png", "good.png"]  # each once
    assert {r: e for rows in sunk for r, e in zip(rows["id"], rows["error"])} == {
        "empty.png": "stage failed: prepare raised RuntimeError: mask bug",
        "good.png": "stage failed: prepare raised RuntimeError: mask bug"}


def test_a_dry_run_plans_from_the_log_and_starts_nothing(first_run, source, tmp_path, monkeypatch, capsys):
    """After a partial run (the first run's folder with one of its parts undone), `dry_run`
    through the pipeline counts what is committed and what is left, estimates each stage's
    actor-seconds from the committed parts' timings, fetches no model, starts no actor and
    writes nothing but `run_dir/plan.json`."""
    from blipinpaint.commit_log import CommitLog
    from rayjobs import models, pipeline

    run_dir, cfg, _ = first_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "generate", copy / "generate")
    # One whole part undone (which ids share a part depends on the stream's order: not named ones).
    log = CommitLog(str(copy / "generate"))
    first = log.markers()[0]["name"]
    undone = log.uncommit(lambda m: m["name"] == first)
    assert 1 <= len(undone) <= 3

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run fetched a model or started an actor")

    for where, name in ((generate, "run_stream"), (generate.builders, "fill_store"), (models, "run")):
        monkeypatch.setattr(where, name, refuse)
    written = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    overrides = [f"run_dir={copy}", f"data.source={source}", "stream.rows_per_file=3", "stream.read.batch_size=3",
                 "stream.captioner.min_size=1", "stream.captioner.max_size=2", "masks.kind=mixed", "dry_run=true",
                 "stream.inpainter.num_gpus=0.5"]
    assert pipeline.main(overrides) == 0
    after = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    assert set(after) - set(written) == {copy / "plan.json"} and {p: after[p] for p in written} == written

    plan = json.loads((copy / "plan.json").read_text())
    assert (plan["inputs"], plan["committed"], plan["to_do"]) == (9, 9 - len(undone), len(undone))
    assert plan["parts_to_write"] == -(-len(undone) // 3) and plan["made_by"]["recorded"]["differs"] == []
    assert plan["made_by"]["settings_digest"] and len(plan["made_by"]["inputs_digest"]) == 64
    stages = plan["estimate"]["stages"]
    assert set(stages) == {"prepare", "captioner", "inpainter", "metrics"}
    assert all(s["actor_s"] > 0 for s in stages.values()) and plan["estimate"]["from_rows"] == 9 - len(undone)
    # The inpainter holds half a GPU per actor here: its GPU-hours, the only ones (rounded to 6 places).
    assert plan["estimate"]["gpu_h"] == stages["inpainter"]["gpu_h"] > 0
    assert stages["inpainter"]["gpu_h"] == pytest.approx(stages["inpainter"]["actor_s"] * 0.5 / 3600, abs=1e-6)
    out = capsys.readouterr().out
    assert f"9 inputs, {9 - len(undone)} already committed" in out and "GPU-hours" in out


def test_the_job_runs_a_compiled_unet_and_records_it(local_ray, source, tmp_path):
    """`inpaint.compile` in the job: the inpainter actor compiles its UNet when it starts (on a
    batch of 3: the 5 good inputs arrive as 3 and a padded 2), every input is accounted for,
    and the run's fingerprint records the mode (compiled rows round differently)."""
    stats = generate.run(_cfg(tmp_path, source, "inpaint.compile=default", "stream.inpainter.batch_size=3"))
    assert (stats["ok"], stats["errors"], stats["missing"]) == (5, 4, 0)
    assert stats["fingerprint"]["inpaint.compile"] == "default"
    assert stats["stages"]["inpainter"]["busy_s"] > 0
