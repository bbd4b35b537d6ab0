import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import PIPELINE_ARGS, account, copy_run, end_actors_of_dead_drivers, open_page
from PIL import Image

from blipinpaint.commit_log import CommitLog
from blipinpaint.layout import RunLayout
from blipinpaint.records import METRICS
from blipinpaint.seeds import sample_seed
from rayjobs import evaluate


def test_missing_steps_are_named(tmp_path, capsys):
    """Each step the evaluation reads must have finished (its `_SUCCESS`): a step cut short
    leaves outputs that look whole."""
    assert evaluate.main([f"run_dir={tmp_path}"]) == 2
    assert "generate is not complete (no _SUCCESS): run rayjobs.generate (again) first" in capsys.readouterr().err
    (tmp_path / "generate" / "samples").mkdir(parents=True)
    (tmp_path / "generate" / "_SUCCESS").write_text("")
    (tmp_path / "blip").mkdir()  # a fine-tune cut short: its folder, no _SUCCESS
    assert evaluate.main([f"run_dir={tmp_path}"]) == 2
    assert "finetune is not complete (no _SUCCESS): run rayjobs.finetune_blip (again) first" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def _evaluate_cfg(run_dir, *extra):
    from blipinpaint.config import load_config

    return load_config(overrides=[*PIPELINE_ARGS, f"run_dir={run_dir}", *extra])


def test_the_scorer_is_held_to_what_the_changed_captions_scored(main_run, tmp_path):
    """The scorer's predictions for fine-tuned captions, from the features the evaluate job's
    fine-tuned BLIP stored with each row, against the metrics those rows scored."""
    from blipinpaint.scorer import TARGETS, ScoreNet

    copy_run(main_run[1] / "run", tmp_path, ("eval", "scorer"))
    rows = pq.read_table(tmp_path / "eval" / "samples").to_pylist()
    ids = sorted(r["id"] for r in rows)  # as if every caption had changed
    found = evaluate.scorer_on_changed(RunLayout(str(tmp_path)), ids)
    scorer = ScoreNet.from_pretrained(tmp_path / "scorer" / "model")
    features = np.array([r["caption_finetuned_features"] for r in sorted(rows, key=lambda r: r["id"])])
    assert features.shape == (len(ids), scorer.config.in_features)
    expected = scorer.destandardize(scorer(torch.as_tensor(features, dtype=torch.float32))).detach().numpy()
    assert found["samples"] == len(ids) == 2
    assert list(found["mean_predicted"].values()) == pytest.approx(expected.mean(axis=0).tolist(), rel=1e-5)
    assert found["mean_scored"]["ssim"] == pytest.approx(np.mean([r["ssim_finetuned"] for r in rows]))
    assert found["pearson_r"] == {t: None for t in TARGETS}  # two samples: no correlation worth a number
    assert (tmp_path / "eval" / "scorer_changed.png").stat().st_size > 1000
    none = evaluate.scorer_on_changed(RunLayout(str(tmp_path)), [])
    assert none["samples"] == 0


def test_the_driver_compares_the_decoders_while_the_fid_pass_runs():
    """`alongside` (what `evaluate.run` runs the FID pass and `decoder_survival` with) runs its
    second call while the first is still waiting: the first returns only once the second has
    started (run one after the other, it would wait out its timeout and return False); an
    error of the second reaches the caller."""
    started = threading.Event()
    waited, ran_in = evaluate.alongside(lambda: started.wait(timeout=120),
                                        lambda: (started.set(), threading.current_thread().name)[1])
    assert waited is True and ran_in.startswith("evaluate-alongside")

    def fails():
        raise ValueError("the decoders differ in shape")

    with pytest.raises(ValueError, match="differ in shape"):
        evaluate.alongside(lambda: 1, fails)


def test_limit_picks_a_stable_subset_of_the_held_out_split(main_run):
    folder = main_run[1]
    run = folder / "run"
    everything = evaluate.evaluation_ids(_evaluate_cfg(run, "train.val_fraction=0.9"))
    one = evaluate.evaluation_ids(_evaluate_cfg(run, "train.val_fraction=0.9", "evaluate.limit=2"))
    assert len(everything) >= 4 and len(one) == 2 and set(one) < set(everything)
    assert evaluate.evaluation_ids(_evaluate_cfg(run, "train.val_fraction=0.9", "evaluate.limit=2")) == one
    assert one == sorted(sorted(everything, key=lambda i: sample_seed(0, i, "evaluate"))[:2])  # by a hash


def test_rows_of_another_fine_tuned_decoder_are_refused(main_run, tmp_path, capsys):
    """Evaluated rows made with one fine-tuned BLIP never mix with another's: the fingerprint
    holds the BLIP folder's content digest, so other bytes under the same path are another model."""
    from blipinpaint.storage import write_manifest

    folder = main_run[1]
    copy_run(folder / "run", tmp_path, ("generate", "scorer", "finetune", "blip", "eval"))
    config = tmp_path / "blip" / "config.json"
    config.write_text(config.read_text().replace("\n", "\n "))  # another BLIP, published in its place
    write_manifest(str(tmp_path / "blip"))
    assert evaluate.main([*PIPELINE_ARGS, f"run_dir={tmp_path}"]) == 2
    said = capsys.readouterr().err
    assert "holds the eval step's output of other settings or inputs (finetuned_decoder differ)" in said, said


def test_a_killed_driver_error_rows_then_retry_failed_and_another_run_in_table1(main_run, local_ray, tmp_path,
                                                                                browser):
    """A captioner failing on one held-out sample's batch, and the driver killed after its
    first commit: the same command evaluates only what was not committed (each sample once),
    the failed sample becomes an error row counted in the report, and `evaluate.retry_failed`
    evaluates it again. That run's Table 1 also shows another run's evaluation
    (`evaluate.other_runs`, as the VisualGenome config does with COCO's)."""
    folder = main_run[1]
    copy_run(folder / "run", tmp_path)
    args = [*PIPELINE_ARGS, f"run_dir={tmp_path}", "train.val_fraction=0.9", "evaluate.fid.size=1",
            "stream.rows_per_file=1", "data.name=second",
            "stream.captioner.batch_size=1"]  # the victim's batch holds the victim alone
    ids = evaluate.evaluation_ids(_evaluate_cfg(tmp_path, *args))
    victim = ids[-1]  # late in the run: the driver is killed before its row commits
    failing = [*args, "stream.inject_failure.stage=captioner", f"stream.inject_failure.id={victim}",
               "stream.batch_retries=0"]
    driver = subprocess.Popen([sys.executable, "-m", "rayjobs.evaluate", *failing,
                               f"ray_address={local_ray.get_runtime_context().gcs_address}"],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=os.environ.copy())
    commits = tmp_path / "eval" / "_commits"
    deadline = time.time() + 240
    while time.time() < deadline and not (list(commits.glob("*.json")) if commits.exists() else []):
        assert driver.poll() is None, "evaluate ended before it could be killed"
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    end_actors_of_dead_drivers(local_ray, driver.pid)  # its actors may have committed a few more rows meanwhile
    committed_before = len(CommitLog(str(tmp_path / "eval")).committed_ids())
    assert not (tmp_path / "eval" / "report.json").exists()

    first = evaluate.run(_evaluate_cfg(tmp_path, *failing))
    # It redid nothing committed (a write task of the killed run may still have landed meanwhile).
    assert first["evaluation_set"]["this_run"]["evaluated"] <= len(ids) - committed_before
    figures = account(tmp_path / "eval", ids)
    assert (figures["committed"], figures["lost"], figures["duplicated"], figures["orphans"]) == (len(ids), 0, 0, 0)
    s = first["evaluation_set"]
    assert (s["selected"], s["samples"], s["errors"]) == (len(ids), len(ids) - 1, 1)
    assert s["errors_by_reason"] == {"stage failed": 1}
    errors = pq.read_table(tmp_path / "eval" / "errors").to_pylist()
    assert [(r["id"], r["error"].split(":")[0]) for r in errors] == [(victim, "stage failed")]
    open_page(browser, tmp_path / "eval" / "report.html")  # the error row in the page's table too
    assert [[td.text for td in tr.find_elements("tag name", "td")][:2] for tr in browser.find_elements(
        "css selector", "#error-table tbody tr")] == [["evaluate", victim]]

    with Image.open(tmp_path / "eval" / "grid.png") as grid:
        six_rows = grid.size[1]

    second = evaluate.run(_evaluate_cfg(tmp_path, *args, "evaluate.retry_failed=true", "evaluate.grid_rows=2",
                                       "evaluate.gallery_limit=2", f"evaluate.other_runs=[{folder / 'run'}]"))
    with Image.open(tmp_path / "eval" / "grid.png") as grid:
        assert grid.size[1] < 0.5 * six_rows  # `evaluate.grid_rows`: 2 samples shown instead of 6
    open_page(browser, tmp_path / "eval" / "report.html")  # `evaluate.gallery_limit`: 2 cards, and it says so
    shown = [c.get_attribute("data-id") for c in browser.find_elements("css selector", "#gallery .card")]
    assert shown == sorted(sorted(ids, key=lambda i: sample_seed(0, i, "gallery"))[:2])  # by the stable hash
    assert f"The gallery shows 2 of {len(ids)} held-out samples" in browser.find_element("tag name", "body").text
    assert not list((tmp_path / "eval" / "report_files").glob("00002-*"))  # the earlier page's third card's
    s = second["evaluation_set"]
    assert (s["samples"], s["errors"], s["this_run"]["retried"], s["this_run"]["evaluated"]) == (len(ids), 0, 1, 1)
    figures = account(tmp_path / "eval", ids)
    assert (figures["committed"], figures["lost"], figures["duplicated"], figures["orphans"]) == (len(ids), 0, 0, 0)
    table = (tmp_path / "eval" / "report.md").read_text().split("## Table 1")[1].split("\n## ")[0]
    header = next(line for line in table.splitlines() if line.startswith("|"))
    assert "second: CLIP score ↑" in header and "samples: CLIP score ↑" in header  # a column group per dataset


def test_scorer_reranked_captions_add_a_variant_to_every_table_and_the_page(main_run, local_ray, tmp_path, browser):
    """`caption.candidates=4`: the stream's reranked caption is the Reranker's own pick (seeded
    per sample: the same in a worker as here); a sample whose pick is the greedy caption reuses
    the BLIP variant's inpainting and scores, the others are inpainted from the same noise;
    report.json records N and how often the pick differs; Table 1, the other tables, the
    plots' legends and the page's cards show the variant."""
    from blipinpaint import builders
    from blipinpaint.io import decode_png
    from blipinpaint.storage import write_manifest

    copy_run(main_run[1] / "run", tmp_path)
    cfg = _evaluate_cfg(tmp_path, "caption.candidates=4", "train.val_fraction=0.9")
    report = evaluate.run(cfg)
    rows = sorted(pq.read_table(tmp_path / "eval" / "samples").to_pylist(), key=lambda r: r["id"])
    assert len(rows) == report["evaluation_set"]["samples"] >= 4

    reranker = builders.build_reranker(cfg, str(tmp_path / "scorer" / "model"))
    batch = {"id": np.array([r["id"] for r in rows], dtype=object),
             "image": np.stack([decode_png(r["image_png"]) for r in rows]),
             "mask": np.stack([(decode_png(r["mask_png"]) > 127).astype(np.uint8) for r in rows])}
    assert [r["caption_reranked"] for r in rows] == list(reranker(batch)["caption_reranked"])
    differs = [r["caption_reranked"] != r["caption"] for r in rows]
    assert report["reranked"] == {"candidates": 4, "differs": sum(differs), "of": len(rows),
                                  "share": pytest.approx(sum(differs) / len(rows))}
    for row, changed in zip(rows, differs):
        same = [row[m + "_reranked"] == row[m] for m in METRICS]
        if not changed:  # the BLIP variant's, reused
            assert row["inpainted_reranked_png"] == row["inpainted_png"] and all(same)
        else:  # its own inpainting (the caption was its only input that differs) and scores
            assert row["inpainted_reranked_png"] != row["inpainted_png"] and not all(same)
    assert any(differs), "no reranked caption differed from the greedy one: the inpainting path went untested"

    assert list(report["variants"]) == ["baseline", "blip", "finetuned", "reranked"]
    assert report["variants"]["reranked"]["ssim"]["mean"] == pytest.approx(np.mean([r["ssim_reranked"] for r in rows]))
    assert report["intervals"]["all"]["reranked_vs_blip"]["ssim"]["n"] == len(rows)
    markdown = (tmp_path / "eval" / "report.md").read_text()
    table = markdown.split("## Table 1")[1].split("\n## ")[0]
    line = next(r for r in table.splitlines() if r.startswith("| + scorer-reranked caption |"))
    assert "n/a" not in line and f"| {len(rows)} |" in line
    assert "| reranked − BLIP (paired) |" in table
    assert f"differs from the greedy caption on {sum(differs)} of {len(rows)}" in markdown
    assert "reranked: CLIP ↑" in markdown.split("## By mask area")[1]

    found = open_page(browser, tmp_path / "eval" / "report.html")
    assert not found["console_errors"] and not found["broken_images"]
    assert f"differs from the greedy caption on {sum(differs)} of {len(rows)}" in browser.find_element(
        "css selector", "p.lead").text
    titles = [f.text.split("\n")[0] for f in browser.find_elements("css selector", "#gallery .card")[0].find_elements(
        "css selector", "figcaption b")]
    assert titles[-1] == "scorer-reranked caption" and len(titles) == 6
    options = [o.text for o in browser.find_elements("css selector", "option")]
    assert "reranked − BLIP: SSIM" in options

    # Rows picked with 4 candidates, or by this scorer, never mix with others.
    with pytest.raises(evaluate.ConfigError, match=r"caption.candidates, reranking_scorer differ"):
        evaluate.run(_evaluate_cfg(tmp_path, "train.val_fraction=0.9"))
    weights = tmp_path / "scorer" / "model" / "model.safetensors"  # another scorer, published in its place
    weights.write_bytes(weights.read_bytes() + b" ")
    write_manifest(str(tmp_path / "scorer" / "model"))
    with pytest.raises(evaluate.ConfigError, match=r"reranking_scorer differ"):
        evaluate.run(cfg)
