"""BLIP fine-tuning through the frozen scorer, on the tiny models with 2 CPU workers."""

import json

import numpy as np
import pytest
import torch
from helpers import copy_run
from safetensors.torch import load_file
from transformers import BlipForConditionalGeneration

from blipinpaint import builders
from blipinpaint.config import load_config
from blipinpaint.io import decode_png
from blipinpaint.models import ModelRef
from rayjobs import finetune_blip


def test_only_the_text_decoder_changes(main_run):
    """The main run fine-tuned (`helpers.PIPELINE_ARGS`: 2 epochs at lr 1e-3, batches of 2)."""
    run_dir = main_run[1] / "run"
    cfg = load_config(overrides=[f"run_dir={run_dir}"])
    report = json.loads((run_dir / "finetune" / "report.json").read_text())
    original = load_file(f"{builders.resolve_preset(cfg).captioner.name_or_path}/model.safetensors")
    tuned = load_file(run_dir / "blip" / "model.safetensors")
    assert original.keys() == tuned.keys()
    changed = {k for k in original if not torch.equal(original[k], tuned[k])}
    assert changed and all(k.startswith("text_decoder.") for k in changed)
    assert all(torch.equal(original[k], tuned[k]) for k in original if k.startswith("vision_model."))
    assert report["scorer_unchanged"] and report["steps"] >= 2
    assert report["frozen_unchanged"]  # the vision model, in the workers, through every step
    records = [json.loads(line) for line in (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert {r["epoch"] for r in steps} == {0, 1} and all("loss_blip" in r for r in steps)
    for png in ("loss.png", "probe.png"):
        assert (run_dir / "finetune" / png).stat().st_size > 1000


def test_the_probe_set_shows_the_captions_changing_epoch_by_epoch(main_run):
    """lr 1e-3 (the main run's) changes tiny-model captions: the probe set, decoded before
    training and after each epoch, counts them; lr 1e-6 would leave the count at 0."""
    run_dir = main_run[1] / "run"
    report = json.loads((run_dir / "finetune" / "report.json").read_text())
    records = [json.loads(line) for line in (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if "probe_changed" in r]
    assert [r["epoch"] for r in probes] == [-1, 0, 1]
    before = probes[0]["probe_captions"]
    assert probes[0]["probe_changed"] == 0 and probes[0]["probe_edit_distance"] == 0
    for r in probes[1:]:  # counted against the captions before training
        assert r["probe_changed"] == sum(a != b for a, b in zip(r["probe_captions"], before))
        assert (r["probe_edit_distance"] > 0) == (r["probe_changed"] > 0)
        assert all(np.isfinite(r[f"probe_pred_{m}"]) for m in ("ssim", "psnr", "clip"))
    assert probes[-1]["probe_changed"] == report["probe_changed"] > 0
    assert probes[-1]["probe_captions"] == [r["fine_tuned"] for r in report["probe"]]
    # Training and held-out images both (the main run's 6 samples: every one of them).
    held = [r for r in report["probe"] if r["heldout"]]
    assert len(held) == 2 and len(report["probe"]) == 6
    assert report["probe_changed_heldout"] == sum(r["caption"] != r["fine_tuned"] for r in held)
    assert [r["epoch"] for r in report["probe_by_epoch"]] == [-1, 0, 1]


def test_the_fine_tuned_folder_captions_as_the_trained_model_did(main_run):
    """The job decodes a probe batch with the decoder it trained, in memory; the saved folder,
    reloaded the way generate and evaluate load a captioner, must give the very same captions."""
    import pyarrow.parquet as pq

    run_dir = main_run[1] / "run"
    folder = run_dir / "blip"
    BlipForConditionalGeneration.from_pretrained(folder, use_safetensors=True)
    report = json.loads((run_dir / "finetune" / "report.json").read_text())
    probe = {r["id"]: r for r in report["probe"]}
    # lr 1e-3 moves the tiny decoder's captions: an unchanged folder could not pass below.
    assert probe and report["probe_changed"] > 0

    rows = pq.read_table(run_dir / "generate" / "samples", columns=["id", "caption", "image_png", "mask_png"])
    rows = [r for r in rows.to_pylist() if r["id"] in probe]
    # Before training the job's own decoding gave generate's captions: the same masked pixels and decoding.
    assert [r["caption"] for r in rows] == [probe[r["id"]]["caption"] for r in rows]
    batch = {"id": np.array([r["id"] for r in rows], dtype=object),
             "image": np.stack([decode_png(r["image_png"]) for r in rows]),
             "mask": np.stack([decode_png(r["mask_png"]) > 127 for r in rows])}
    cfg = load_config(overrides=[f"models.captioner.name_or_path={folder}"])
    assert builders.resolve_preset(cfg).captioner == ModelRef(str(folder))
    out = builders.build_captioner(cfg)(batch)
    assert list(out["caption"]) == [probe[r["id"]]["fine_tuned"] for r in rows]


def test_zero3_in_bf16_with_a_kl_term_and_offload_resumes_after_a_worker_death(main_run, tmp_path):
    """ZeRO-3 partitions parameters whose sizes do not split evenly over 2 ranks (the tiny decoder's
    37-wide layers): restoring the fp32 masters of a bf16 engine must set each rank's padded part.
    The optimizer state lives in CPU memory (DeepSpeed refused a torch optimizer there). Rank 0
    dies at the second step: each rank reloads its own partition, through the weights-only loader."""
    run_dir = tmp_path / "run"  # the main run's samples and scorer, so this run writes its own blip/ and finetune/
    copy_run(main_run[1] / "run", run_dir, ("generate", "scorer"))
    report = finetune_blip.run(load_config(overrides=[
        f"run_dir={run_dir}", "finetune.batch_size=4", "finetune.lr=1e-3", "train.zero_stage=3", "models.dtype=bf16",
        "finetune.epochs=2", "finetune.kl_weight=0.1", "train.offload_optimizer=true", "train.inject_failure_at_step=2",
        "finetune.lambda_ssim=0.3", "finetune.lambda_psnr=0.05", "finetune.lambda_clip=2"]))
    assert report["engine"] == {"zero_stage": 3, "offload_optimizer": True, "dtype": "bfloat16", "workers": 2,
                                "cpus_per_worker": 0.5, "global_batch": 4, "batch_per_worker": 2}
    assert report["scorer_unchanged"] and report["frozen_unchanged"]
    assert report["probe"]  # decoded on both ranks in step: ZeRO-3 gathers each layer from both
    assert (run_dir / "blip" / "model.safetensors").exists()
    records = [json.loads(line) for line in (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    # The probe before training survives the restart (it resumed at epoch 1): each epoch probed once.
    assert [r["epoch"] for r in records if "probe_changed" in r] == [-1, 0, 1]
    records = [r for r in records if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]  # one step an epoch here: rank 0 died at epoch 1's step
    assert [r["resumed_at_epoch"] for r in records] == [None, 1]  # ... and the restart loaded epoch 0
    assert report["steps"] == 2  # the optimizer steps of an uninterrupted run
    assert all(r["kl"] >= 0 and r["loss"] == pytest.approx(r["loss_blip"] + 0.1 * r["kl"], rel=1e-5, abs=1e-6)
               for r in records)
    # L_BLIP with the configured λs, from the batch means the scorer predicted (the loss is linear in them).
    assert all(r["loss_blip"] == pytest.approx(0.3 * (1 - r["pred_ssim"]) - 0.05 * r["pred_psnr"] - 2 * r["pred_clip"],
                                               rel=1e-4, abs=1e-4) for r in records)


def test_fp16_without_gpu_training_is_refused_before_any_work(tmp_path, capsys):
    """DeepSpeed has no fp16 training on CPU workers: say so instead of falling back to fp32."""
    assert finetune_blip.main([f"run_dir={tmp_path}", "models.dtype=fp16", "models.device=cuda"]) == 2
    assert "models.dtype=fp16 fine-tunes on GPUs only: set train.use_gpu=true" in capsys.readouterr().err
    assert not (tmp_path / "finetune").exists()
