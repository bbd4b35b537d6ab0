import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import PIPELINE_ARGS
from PIL import Image
from transformers import BlipForConditionalGeneration

from blipinpaint import builders
from blipinpaint.config import load_config
from blipinpaint.evaluation import ALL, FID_SETS, REAL, bucket_of
from blipinpaint.fid import fid_table, fold
from blipinpaint.layout import RunLayout
from blipinpaint.precision import survival_line
from blipinpaint.records import METRICS
from blipinpaint.seeds import heldout
from rayjobs import evaluate, fid_pass, pipeline

ARGS = PIPELINE_ARGS


def test_main_job_runs_every_step_and_reuses_them(main_run, capsys, monkeypatch):
    """generate -> train_scorer -> finetune_blip -> evaluate; a rerun does nothing twice."""
    code, folder, output = main_run
    assert code == 0, output[-3000:]
    monkeypatch.chdir(folder)
    args, run = ARGS, folder / "run"
    stats = json.loads((run / "generate" / "stats.json").read_text())
    assert (stats["inputs"], stats["ok"], stats["errors"]) == (6, 6, 0)
    samples = pq.read_table(run / "generate" / "samples")
    assert samples.num_rows == 6 and len(set(samples.column("caption").to_pylist())) > 1
    assert (run / "scorer" / "model" / "model.safetensors").exists()
    BlipForConditionalGeneration.from_pretrained(run / "blip", use_safetensors=True)
    assert json.loads((run / "scorer" / "report.json").read_text())["epochs"] == 2
    assert json.loads((run / "finetune" / "report.json").read_text())["scorer_unchanged"]
    # Both trainings ran without compiling DeepSpeed's CPU shared-memory op (inference only).
    assert not list(Path.home().glob(".cache/torch_extensions/*/deepspeed_shm_comm"))

    # The evaluation set is exactly the held-out split, never a training row.
    evaluated = pq.read_table(run / "eval" / "samples")
    expected = sorted(i for i in samples.column("id").to_pylist() if heldout(0, i, 0.5))
    assert sorted(evaluated.column("id").to_pylist()) == expected and len(expected) == 2
    generated = {r["id"]: r for r in samples.to_pylist()}
    for row in evaluated.to_pylist():  # the third variant starts from the same noise as the other two
        assert row["noise_seed"] == generated[row["id"]]["noise_seed"]
        if row["caption_finetuned"] == row["caption"]:  # reused: the same pixels and scores
            assert row["inpainted_finetuned_png"] == row["inpainted_png"]
            assert all(row[m + "_finetuned"] == row[m] for m in METRICS)
    report = json.loads((run / "eval" / "report.json").read_text())
    # Where the caption helps, per bucket of this run (the advice for inpaint.caption_max_mask_area).
    effect = report["caption_effect"]
    assert set(effect["buckets"]) == set(report["mask_buckets"]) and effect["metrics"] == ["ssim", "psnr"]
    assert all(v in ("helps", "hurts", "unclear") for b in effect["buckets"].values() for v in b.values())
    section = (run / "eval" / "report.md").read_text().split("## Where the caption helps, by mask area")[1]
    assert "inpaint.caption_max_mask_area" in section.split("\n## ")[0]
    changed = sum(r["caption_finetuned"] != r["caption"] for r in evaluated.to_pylist())
    assert (report["changed"]["captions"], report["changed"]["of"]) == (changed, 2)
    assert report["changed"]["scorer"]["samples"] == changed
    delta = report["intervals"]["all"]["blip_vs_baseline"]["clip_score"]
    assert delta["n"] == 2 and delta["low"] <= delta["estimate"] <= delta["high"]
    # Both captions' decoders ran in fp32 (issue 32): every change the fine-tune made survives, as
    # the fine-tune's own report counted, and both jobs' last lines say so.
    precision = report["decoder_precision"]
    assert precision == json.loads((run / "finetune" / "report.json").read_text())["decoder_precision"]
    assert precision["dtype"] == "fp32" and precision["changed"] > 0 and precision["survived_share"] == 1.0
    assert output.count(survival_line(precision)) == 2
    # The defaults evaluate the paper's three variants, no more (no scorer-reranked caption).
    assert list(report["variants"]) == ["baseline", "blip", "finetuned"] and "reranked" not in report
    for name in report["variants"]:
        entry = report["variants"][name]
        assert entry["samples"] == 2 and entry["fid"] >= 0 and entry["clip_score"]["mean"] >= 0
    table = (run / "eval" / "report.md").read_text().split("## Table 1")[1].split("##")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "CLIP" not in line]
    assert len(rows) == 5 and all(cell.strip() and cell.strip() != "n/a" for r in rows for cell in r.split("|")[1:-1])
    for png in ("metrics.png", "mask_buckets.png", "deltas.png", "grid.png"):
        with Image.open(run / "eval" / png) as image:
            assert image.format == "PNG" and image.size[0] > 300

    # Everything is reused: no row, model, training log or report is written twice.
    outputs = [p for p in run.rglob("*") if p.is_file() and "ray_train" not in p.parts and (
        p.parent.name in ("samples", "errors", "_commits", "_checkpoints") or p.suffix == ".safetensors"
        or p.name in ("metrics.jsonl", "report.json", "report.md", "report.html", "check.json"))]
    assert len(outputs) >= 12  # rows and markers, both models, both training logs, every report
    written = {p: p.stat().st_mtime_ns for p in outputs}
    assert pipeline.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in outputs} == written
    assert "skipped 6 already committed" in capsys.readouterr().out

    # Run alone, evaluate redoes only the report from the committed rows.
    assert evaluate.main(args) == 0
    rows = [p for p in outputs if p.parent.name in ("samples", "errors", "_commits", "_checkpoints")]
    assert all(p.stat().st_mtime_ns == written[p] for p in rows)
    assert (run / "eval" / "report.json").stat().st_mtime_ns > written[run / "eval" / "report.json"]


def test_the_output_is_short_and_says_how_far_each_job_got(main_run):
    """Not a terminal (as under `ray job submit` and in CI): each job's own progress lines,
    no redrawn bars, no per-worker chatter; the last progress line counts every row."""
    code, _, output = main_run
    lines = output.splitlines()
    # About 50 lines on 2 cores: the jobs' own ~35 (progress lines and reports), Ray's
    # connection lines, a few warnings Ray's own actors print (one per actor, not per batch).
    assert code == 0 and len(lines) <= 60, output
    # None of it a warning about the project's own code (Ray's deprecations of what it passes).
    assert not [line for line in lines if "Warning" in line and ("rayjobs/" in line or "blipinpaint/" in line)], output
    committed = [line for line in lines if line.startswith("generate: ") and " rows committed " in line]
    assert committed and committed[-1].startswith("generate: 6 of 6 rows committed (0 errors)"), output
    evaluated = [line for line in lines if line.startswith("evaluate: ") and " rows committed " in line]
    assert evaluated and evaluated[-1].startswith("evaluate: 2 of 2 rows committed"), output
    for job, epochs in (("train_scorer", 2), ("finetune_blip", 2)):
        assert any(f"{job}: epoch {epochs} of {epochs} done, " in line for line in lines), output


def test_distributed_fid_equals_one_pass(main_run, monkeypatch):
    """Two FID actors on shards of the job's own rows, merged: the numbers of one local pass.

    The features are recomputed here at another batch size (float32 convolutions round
    differently), so this compares to 1e-4; merging itself is exact (tests/test_fid.py)."""
    folder = main_run[1]
    monkeypatch.chdir(folder)
    cfg = load_config(overrides=ARGS)
    ids = evaluate.evaluation_ids(cfg)
    distributed, scopes = fid_pass.compute_fid(cfg, RunLayout(cfg.run_dir).eval, FID_SETS, ids, changed=ids[::-1])
    intervals = scopes[ALL]
    assert scopes["changed"] == intervals  # the changed scope's rows, here every one, in id order

    rows = pq.read_table(folder / "run" / "eval" / "samples").to_pydict()
    one = builders.build_fid(cfg, FID_SETS)({"id": rows["id"], **{k: rows[k] for k in FID_SETS.values()}})
    areas = dict(zip(rows["id"], rows["mask_area"]))
    single = fid_table(fold({name: one[name] for name in FID_SETS},
                            bucket_of([areas[i] for i in one["id"]], cfg.evaluate.mask_buckets)), real=REAL)
    assert distributed.keys() == single.keys() == evaluate.evaluated_variants(cfg).keys()
    for name in distributed:
        assert distributed[name]["all"] == pytest.approx(single[name]["all"], rel=1e-4)
        # The bootstrap's full-sample FID, from the rows' own features, is that FID too.
        assert intervals[name]["estimate"] == pytest.approx(single[name]["all"], rel=1e-4)
        assert intervals[name]["low"] <= intervals[name]["high"] and intervals[name]["n"] == len(ids)


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert pipeline.main([f"run_dir={run_dir}", "data.kind=coco"]) == 2  # COCO without data.image_root
    assert "data.image_root must be set" in capsys.readouterr().err
    assert not run_dir.exists()


def test_a_changed_training_setting_is_refused_or_replaced_never_taken_as_done(main_run, tmp_path, capsys):
    """A rerun of a finished run with another fine-tuning rate (issue 31, finding 2): it once
    trained nothing, rewrote config.yaml and reported the new setting. Now it refuses, naming
    the key and the way forward; with `restart=[finetune]` the old fine-tune (and the
    evaluation that read it) moves aside under a dated name, and both are redone."""
    import shutil

    shutil.copytree(main_run[1] / "run", tmp_path / "run")
    run = RunLayout(str(tmp_path / "run"))
    args = [f"run_dir={run.root}", *ARGS[1:], "finetune.lr=2e-3"]
    steps = [Path(folder) for folder in (run.scorer, run.finetune, run.blip, run.eval)]
    kept = {p: p.stat().st_mtime_ns for folder in steps for p in folder.rglob("*") if p.is_file()}
    assert pipeline.main(args) == 2
    said = capsys.readouterr().err
    assert "finetune.lr differ" in said and "restart=[finetune] moves it aside" in said, said
    assert {p: p.stat().st_mtime_ns for folder in steps for p in folder.rglob("*") if p.is_file()} == kept

    assert pipeline.main([*args, "restart=[finetune]"]) == 0
    aside = sorted(p.name.split(".replaced-")[0] for p in Path(run.root).iterdir() if ".replaced-" in p.name)
    assert aside == ["blip", "eval", "finetune"]  # the scorer and generate were not touched
    assert json.loads(Path(run.finetune.success).read_text())["finetune.lr"] == 2e-3
    assert json.loads(Path(run.eval.report).read_text())["fingerprint"]["finetuned_decoder"] != json.loads(
        next(Path(run.root).glob("eval.replaced-*/report.json")).read_text())["fingerprint"]["finetuned_decoder"]
    assert all(p.stat().st_mtime_ns == kept[p] for p in kept if "/scorer/" in str(p))
