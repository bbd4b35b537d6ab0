"""Reward-ranked fine-tuning (issue 18, part 2): the candidates stream (exactly once, real
metrics, one noise per image) and BLIP learning each training image's best candidate.

Works on copies of the session's main run (`main_run`): its 4 training images, 4 candidates
each; the captioner fails on one of them (`VICTIM`), whose candidates become error rows."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import PIPELINE_ARGS, account, copy_run, end_actors_of_dead_drivers, print_figures

from blipinpaint import builders
from blipinpaint.candidates import PENDING, best_candidates, best_captions, candidate_id, expand
from blipinpaint.commit_log import CommitLog
from blipinpaint.config import load_config
from blipinpaint.errors import ConfigError
from blipinpaint.io import decode_png
from blipinpaint.losses import LossWeights, caption_lm_loss
from blipinpaint.reader import split_reads
from rayjobs import candidates, finetune_blip, pipeline

N = 4  # candidates per image
VICTIM = "chelsea.jpg"  # a training image of the main run


def _args(run_dir, *extra):
    # One image at a time through every stage, each candidate into its own part: parts commit
    # while later candidates are still being inpainted, so a kill lands with work on both sides.
    return [f"run_dir={run_dir}", f"caption.candidates={N}", "stream.rows_per_file=1", "stream.read.batch_size=1",
            "stream.captioner.batch_size=1", "stream.inpainter.batch_size=1", "stream.metrics.batch_size=1",
            "stream.inject_failure.stage=captioner", f"stream.inject_failure.id={VICTIM}", *extra]


def _training_ids(run_dir):
    train, _ = split_reads(load_config(overrides=[f"run_dir={run_dir}"]))
    return sorted(i for r in train for i in r["ids"])


@pytest.fixture(scope="module")
def candidates_run(main_run, local_ray, tmp_path_factory):
    """The candidates of the main run's training images, made by a driver killed after its
    first commit and then by the same command again (twice: the second has nothing to do).
    The captioner raises on every batch holding `VICTIM`."""
    run_dir = tmp_path_factory.mktemp("candidates") / "run"
    copy_run(main_run[1] / "run", run_dir, ("generate",))
    out = run_dir / "candidates"
    args = _args(run_dir)
    started = time.perf_counter()
    old = subprocess.Popen([sys.executable, "-m", "rayjobs.candidates", *args,
                            f"ray_address={local_ray.get_runtime_context().gcs_address}"],
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=os.environ.copy())
    try:
        deadline = time.time() + 300
        while not CommitLog(str(out)).markers():
            assert old.poll() is None, f"the job ended before its first commit: {old.stderr.read()[-2000:]}"
            assert time.time() < deadline, "no candidate committed in 300 s"
            time.sleep(0.05)
    finally:
        if old.poll() is None:
            os.killpg(old.pid, signal.SIGKILL)  # the driver, as a lost head node or `kill -9` ends it
        old.wait()
        end_actors_of_dead_drivers(local_ray, old.pid)  # its actors too: nothing commits behind the rerun's back
    committed_before = len(CommitLog(str(out)).committed_ids())
    cfg = load_config(overrides=args)
    rerun = candidates.run(cfg)
    again = candidates.run(cfg)
    ids = [candidate_id(i, k) for i in _training_ids(run_dir) for k in range(N)]
    figures = account(out, ids)
    print_figures("candidates: driver killed after its first commit, then the same command", figures,
                  time.perf_counter() - started, committed_before=committed_before,
                  done_by_rerun=rerun["this_run"]["processed"])
    return {"run_dir": run_dir, "cfg": cfg, "committed_before": committed_before, "rerun": rerun, "again": again,
            "figures": figures, "ids": ids}


def _rows(run_dir) -> list[dict]:
    return sorted(pq.read_table(run_dir / "candidates" / "samples").to_pylist(), key=lambda r: r["id"])


def _generated(run_dir) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(run_dir / "generate" / "samples").to_pylist()}


def test_a_killed_driver_and_a_rerun_commit_every_candidate_once(candidates_run):
    c = candidates_run
    assert len(c["ids"]) == 4 * N  # the main run's 4 training images
    assert 1 <= c["committed_before"] < len(c["ids"])  # killed mid-run: work on both sides
    # Only what was missing (a commit of the killed run landing before the take-over counts as done).
    assert 1 <= c["rerun"]["this_run"]["processed"] <= len(c["ids"]) - c["committed_before"]
    f = c["figures"]
    assert (f["committed"], f["lost"], f["duplicated"], f["orphans"]) == (len(c["ids"]), 0, 0, 0)
    assert sorted(f["ids"]) == sorted(c["ids"])
    # The same command once more: nothing to do, nothing written.
    again = c["again"]
    assert again["this_run"]["processed"] == 0 and again["this_run"]["skipped_committed"] == len(c["ids"])
    assert (again["ok"], again["errors"], again["missing"], again["duplicates"]) == (len(c["ids"]) - N, N, 0, 0)
    # The image the captioner failed on: an error row per candidate, with the reason, none dropped.
    errors = pq.read_table(c["run_dir"] / "candidates" / "errors").to_pylist()
    assert sorted(r["id"] for r in errors) == [f"{VICTIM}#{k}" for k in range(N)]
    assert {r["error"] for r in errors} == {f"stage failed: captioner raised RuntimeError: injected failure on "
                                            f"{VICTIM!r}"}
    assert again["images_without_candidates"] == 1 and again["images_ranked"] == 3
    assert (c["run_dir"] / "candidates" / "_SUCCESS").exists()
    assert (c["run_dir"] / "candidates" / "config.yaml").exists()


def test_candidate_zero_is_generates_caption_inpainted_from_the_same_noise(candidates_run):
    """Candidate 0 is the greedy caption: generate's, from generate's noise, so its metrics are
    generate's guided ones. Every candidate of an image shares that noise seed."""
    run_dir = candidates_run["run_dir"]
    generated, rows = _generated(run_dir), _rows(run_dir)
    by_image = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    assert sorted(by_image) == sorted(set(_training_ids(run_dir)) - {VICTIM})
    for image_id, group in by_image.items():
        g = generated[image_id]
        assert [r["candidate"] for r in group] == list(range(N))
        assert [r["id"] for r in group] == [f"{image_id}#{k}" for k in range(N)]
        assert {r["noise_seed"] for r in group} == {g["noise_seed"]}
        assert {r["source"] for r in group} == {g["source"]} and {r["mask_area"] for r in group} == {g["mask_area"]}
        first = group[0]
        assert first["caption"] == g["caption"]
        for m in ("ssim", "psnr", "ssim_hole", "psnr_hole", "clip_score"):
            assert first[m] == pytest.approx(g[m], rel=1e-4, abs=1e-5), (image_id, m)
    # The sampled candidates are other captions, and another caption gives another inpainting.
    assert sum(len({r["caption"] for r in group}) for group in by_image.values()) > len(by_image) * 2
    assert len({round(r["psnr"], 5) for r in rows}) > len(by_image)


def test_a_candidates_metrics_are_those_of_its_inpainting(candidates_run):
    """A sampled candidate, inpainted and scored again here from its image's noise: the row's
    metrics are what the inpainter and metrics stages give for that caption."""
    run_dir, cfg = candidates_run["run_dir"], candidates_run["cfg"]
    generated, rows = _generated(run_dir), _rows(run_dir)
    row = next(r for r in rows if r["candidate"] == N - 1)
    g = generated[row["image_id"]]
    batch = {"id": np.array([row["image_id"]], dtype=object),  # the image's id: its noise seed
             "image": decode_png(g["image_png"])[None],
             "mask": (decode_png(g["mask_png"]) > 127).astype(np.uint8)[None],
             "mask_area": np.array([g["mask_area"]], dtype=np.float32),
             "caption": np.array([row["caption"]], dtype=object)}
    out = builders.build_inpainter(cfg, {"inpainted": "caption"})(batch)
    assert out["noise_seed"][0] == row["noise_seed"]
    scored = builders.build_metrics(cfg, {"": ("inpainted", "caption")})(out)
    for m in ("ssim", "psnr", "ssim_hole", "psnr_hole", "clip_score"):
        assert float(scored[m][0]) == pytest.approx(row[m], rel=1e-4, abs=1e-5), m


def test_the_best_caption_is_the_argmin_of_the_real_loss(candidates_run):
    run_dir, cfg = candidates_run["run_dir"], candidates_run["cfg"]
    w = builders.loss_weights(cfg)
    expected = {}
    for r in _rows(run_dir):  # in candidate order: a later candidate must be strictly better to win
        loss = w.ssim * (1 - r["ssim"]) - w.psnr * r["psnr"] - w.clip * r["clip_score"]
        if r["image_id"] not in expected or loss < expected[r["image_id"]][0] - 1e-9:
            expected[r["image_id"]] = (loss, r["candidate"], r["caption"])
    best = best_captions(cfg, _training_ids(run_dir), w)
    assert sorted(best) == sorted(expected)
    for image_id, (loss, k, caption) in expected.items():
        assert (best[image_id]["candidate"], best[image_id]["caption"]) == (k, caption)
        assert best[image_id]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-5)
    stats = json.loads((run_dir / "candidates" / "stats.json").read_text())
    assert stats["best_is_greedy"] == sum(k == 0 for _, k, _ in expected.values())
    assert stats["images_ranked"] == len(expected) == 3 and stats["images_without_candidates"] == 1  # the victim


def test_an_image_expands_to_a_row_per_pending_candidate_and_its_costs_are_not_counted_twice():
    batch = {"id": np.array(["a", "b#1"], dtype=object), PENDING: np.array(["0,1,2", "3"], dtype=object),
             "image": np.arange(2 * 4).reshape(2, 2, 2), "seconds_prepare": np.array([0.3, 0.5]),
             "retries_prepare": np.array([2, 0])}
    out, pairs = expand(batch)
    assert list(out["id"]) == ["a#0", "a#1", "a#2", "b#1#3"] and list(out["image_id"]) == ["a", "a", "a", "b#1"]
    assert list(out["candidate"]) == [0, 1, 2, 3] and pairs == [(0, 0), (0, 1), (0, 2), (1, 3)]
    assert (out["image"][1] == batch["image"][0]).all() and PENDING not in out
    assert out["seconds_prepare"].sum() == pytest.approx(0.8) and list(out["retries_prepare"]) == [2, 0, 0, 0]


def test_ties_go_to_the_first_candidate_and_a_nan_ranks_last():
    rows = {"image_id": np.array(["a", "a", "a", "b", "b"], dtype=object), "candidate": np.array([2, 0, 1, 0, 1]),
            "caption": np.array(["a2", "a0", "a1", "b0", "b1"], dtype=object),
            "ssim": np.array([0.5, 0.5, 0.5, np.nan, 0.1]), "psnr": np.array([10.0, 10.0, 10.0, 30.0, 1.0]),
            "clip_score": np.zeros(5)}
    best = best_candidates(rows, LossWeights())
    assert best["a"]["candidate"] == 0 and best["a"]["caption"] == "a0"  # three equal: the first
    assert best["b"]["candidate"] == 1 and best["b"]["greedy_loss"] == float("inf")  # NaN: never chosen


def test_the_language_model_loss_is_the_cross_entropy_of_the_next_caption_token():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.tensor([[1, 4, 5, 2, 0], [1, 6, 2, 0, 0]])  # [DEC] words [SEP] [PAD]
    tokens = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    terms = [-torch.log_softmax(logits[b, t - 1], dim=-1)[ids[b, t]] for b in range(2) for t in range(5)
             if tokens[b, t]]
    assert caption_lm_loss(logits, ids, tokens).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


def test_reward_ranked_fine_tuning_makes_the_best_candidates_the_greedy_captions(candidates_run, tmp_path):
    """No scorer in this run folder: reward_ranked needs none. lr 1e-2 in batches of 2, 14
    epochs: enough for the tiny decoder to learn 3 captions (the victim, without candidates,
    is left out). One worker: Ray Train splits a dataset equally over its workers, and 3
    rows over 2 would leave one out of every epoch."""
    run_dir = tmp_path / "run"
    copy_run(candidates_run["run_dir"], run_dir, ("generate", "candidates"))
    report = finetune_blip.run(load_config(overrides=[
        f"run_dir={run_dir}", f"caption.candidates={N}", "finetune.method=reward_ranked", "finetune.lr=1e-2",
        "finetune.batch_size=2", "finetune.epochs=14", "train.num_workers=1"]))
    share = report["best_caption_share"]
    print(f"\nREWARD_RANKED greedy caption = best candidate: before {share['before']:.2f}, after {share['after']:.2f} "
          f"of {share['images']} training images")
    assert report["method"] == "reward_ranked" and report["scorer_unchanged"] is None
    assert report["reward_ranked"] == {"training_images": 4, "trained_on": 3, "left_out_without_candidates": 1,
                                       "best_is_greedy": json.loads((run_dir / "candidates" / "stats.json")
                                                                    .read_text())["best_is_greedy"]}
    # The shares, from the captions themselves: before training the greedy captions are generate's.
    cfg = load_config(overrides=[f"run_dir={run_dir}"])
    best = best_captions(cfg, _training_ids(run_dir), builders.loss_weights(cfg))
    trained = [r for r in report["probe"] if not r["heldout"] and r["id"] != VICTIM]  # the victim: no best
    assert share["images"] == len(trained) == 3
    assert share["before"] == sum(r["caption"] == best[r["id"]]["caption"] for r in trained) / 3
    assert share["after"] == sum(r["fine_tuned"] == best[r["id"]]["caption"] for r in trained) / 3
    assert share["after"] >= share["before"] + 0.6  # at least 2 more of the 3 images
    by_epoch = [r["best_caption_share"] for r in report["probe_by_epoch"]]
    assert by_epoch[0] == share["before"] and by_epoch[-1] == share["after"]
    records = [json.loads(line) for line in (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all("loss_lm" in r and "loss_blip" not in r for r in steps)
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    assert report["frozen_unchanged"] and (run_dir / "blip" / "model.safetensors").exists()
    assert not (run_dir / "scorer").exists()


def test_reward_ranked_refuses_missing_or_other_candidates(candidates_run, tmp_path):
    run_dir = tmp_path / "run"
    copy_run(candidates_run["run_dir"], run_dir, ("generate",))
    with pytest.raises(ConfigError, match=r"candidates is not complete \(no _SUCCESS\): run rayjobs.candidates"):
        finetune_blip.run(load_config(overrides=[f"run_dir={run_dir}", f"caption.candidates={N}",
                                                 "finetune.method=reward_ranked"]))
    copy_run(candidates_run["run_dir"], run_dir, ("candidates",))
    with pytest.raises(ConfigError, match="caption.candidates differ"):  # made with 4 per image, asked for 5
        finetune_blip.run(load_config(overrides=[f"run_dir={run_dir}", "caption.candidates=5",
                                                 "finetune.method=reward_ranked"]))
    (run_dir / "candidates" / "_SUCCESS").unlink()  # as a killed candidates run leaves it
    with pytest.raises(ConfigError, match=r"candidates is not complete \(no _SUCCESS\): run rayjobs.candidates"):
        finetune_blip.run(load_config(overrides=[f"run_dir={run_dir}", f"caption.candidates={N}",
                                                 "finetune.method=reward_ranked"]))


def test_the_pipeline_runs_the_candidates_before_reward_ranked_fine_tuning(main_run, candidates_run, tmp_path,
                                                                          capsys):
    """The main run, done, with its candidates committed: the pipeline in reward_ranked mode
    passes through the candidates step, which finds nothing to do; the fine-tune made with
    the scorer method is then not taken for this one: it is refused, naming the method."""
    run_dir = tmp_path / "run"
    copy_run(main_run[1] / "run", run_dir, ("generate", "scorer", "finetune", "blip", "eval"))
    copy_run(candidates_run["run_dir"], run_dir, ("candidates",))
    with pytest.raises(ConfigError, match=r"finetune.method.* differ\): restart=\[finetune\]"):
        pipeline.run(load_config(overrides=[*PIPELINE_ARGS[1:], f"run_dir={run_dir}", f"caption.candidates={N}",
                                            "finetune.method=reward_ranked"]))
    said = capsys.readouterr().out
    assert f"4 training images x {N} candidates: {3 * N} scored, {N} errors {{'stage failed': {N}}}; this run " \
           "processed 0" in said



def test_an_image_inpainted_without_text_keeps_its_greedy_caption():
    """Above `inpaint.caption_max_mask_area` every candidate was inpainted without text: their
    scores differ by chance, not by caption, so the greedy caption stays the target."""
    rows = {"image_id": np.array(["a", "a", "b", "b"], dtype=object), "candidate": np.array([0, 1, 0, 1]),
            "caption": np.array(["a0", "a1", "b0", "b1"], dtype=object), "mask_area": np.array([0.5, 0.5, 0.1, 0.1]),
            "ssim": np.array([0.1, 0.9, 0.1, 0.9]), "psnr": np.zeros(4), "clip_score": np.zeros(4)}
    policy = best_candidates(rows, LossWeights(), caption_max_mask_area=0.3)
    assert (policy["a"]["candidate"], policy["b"]["candidate"]) == (0, 1)
    assert best_candidates(rows, LossWeights())["a"]["candidate"] == 1  # without the policy: the better one
