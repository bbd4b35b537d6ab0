"""Fine-tune BLIP's text decoder through the frozen scoring network.

    python -m rayjobs.finetune_blip [--config CONFIG.yaml] [dotted.key=value ...]

On a cluster (the tunnel, the token, logs and stop: docs/cluster.md):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.finetune_blip --config configs/paper-coco.yaml

Each training image's caption is teacher-forced through the text decoder; layer
`scorer.feature_layer`'s states over its tokens feed the frozen scorer, and L_BLIP =
λ1·(1 − SSIM) − λ2·PSNR − λ3·CLIP on its predictions is minimised on Ray Train DeepSpeed
ZeRO workers; only the text decoder trains. With `finetune.method=reward_ranked` the
decoder instead learns each image's best candidate (`rayjobs.candidates`) by its
language-model loss. A fixed probe set is captioned before training and after each epoch.
Writes `run_dir/blip/` (a Hugging Face folder, safetensors) and `run_dir/finetune/`
(`metrics.jsonl`, `loss.png`, `probe.png`, `report.json`, `config.yaml`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import tempfile

import numpy as np
import ray
import ray.train
import torch

from blipinpaint import builders, fingerprint
from blipinpaint.candidates import best_candidates, candidate_id
from blipinpaint.captioning import caption_ids, caption_token_mask, decode_caption, encode_images
from blipinpaint.config import Config, to_yaml
from blipinpaint.errors import ConfigError
from blipinpaint.layout import RunLayout
from blipinpaint.losses import LossWeights, blip_loss, caption_kl, caption_lm_loss
from blipinpaint.masks import masked_pixels
from blipinpaint.models import load_captioner
from blipinpaint.plots import plot_curves, write_tensorboard
from blipinpaint.probe import Probe, best_share, probe_set
from blipinpaint.reader import read_candidates, read_rows, split_reads
from blipinpaint.records import decode_images
from blipinpaint.scorer import ScoreNet
from blipinpaint.storage import is_dir, is_file, local_dir, read_jsonl, read_text, upload_dir, write_jsonl, write_text
from blipinpaint.writer import CommitLog
from rayjobs import training
from rayjobs.cli import job_main
from rayjobs.cluster import connect
from rayjobs.progress import TrainProgress
from rayjobs.stream import read_committed

log = logging.getLogger("blipinpaint.finetune_blip")
COLUMNS = ["id", "caption", "image_png", "mask_png"]


def _pixels(batch: dict, image_processor, device, dtype) -> torch.Tensor:
    rows = decode_images(batch)
    visible = masked_pixels(rows["image"], rows["mask"])  # the captioner never sees the hole
    return image_processor(images=list(visible), return_tensors="pt").pixel_values.to(device, dtype)


def finetune_loop(config: dict) -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    cfg: Config = config["cfg"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    bundle = load_captioner(config["captioner"], device)
    model = bundle.model
    model.requires_grad_(False)
    model.text_decoder.requires_grad_(True)
    # reward_ranked trains on the best candidates' captions: no scorer (nor need of one).
    reward_ranked = cfg.finetune.method == "reward_ranked"
    scorer = (None if reward_ranked else
              ScoreNet.from_pretrained(local_dir(config["scorer_dir"])).to(device).requires_grad_(False))
    scorer_before = None if scorer is None else training.checksum(scorer)
    # Copied before DeepSpeed partitions (ZeRO-3) and casts the decoder; cast with it below.
    reference = copy.deepcopy(model.text_decoder).requires_grad_(False) if cfg.finetune.kl_weight > 0 else None
    half = training.half_dtype(cfg)
    # The fp32 weights, before DeepSpeed casts the decoder to `half` (see below).
    initial = {name: p.detach().clone() for name, p in model.text_decoder.named_parameters()} if half else {}
    weights = LossWeights(cfg.finetune.lambda_ssim, cfg.finetune.lambda_psnr, cfg.finetune.lambda_clip)
    optimizer = torch.optim.Adam(model.text_decoder.parameters(), lr=cfg.finetune.lr)
    engine = training.initialize(model.text_decoder, optimizer, training.deepspeed_config(cfg, cfg.finetune.batch_size))
    if half is not None:
        # DeepSpeed cast the decoder to `half`; the frozen encoder and the KL reference follow,
        # or their outputs would meet the decoder's weights in another dtype.
        model.vision_model.to(half)
        if reference is not None:
            reference.to(half)
        # Its fp32 masters start rounded to `half`: put the original values back, or every
        # weight would move by up to half an ulp of bf16 (~0.4 % of it), far more than lr
        # 1e-6 ever moves it.
        training.set_fp32_masters(engine, initial)
    del initial
    # Everything but the text decoder (in the dtype it runs in): it must come out of training as it went in.
    frozen_before = training.checksum(model, skip="text_decoder.")
    state = training.restore(engine)
    if not training.still_owner(config["fence"]):  # a straggler of a run taken over
        return
    start = state["epoch"] + 1 if state else 0
    log_uri = config["log_uri"]
    if rank == 0 and start > 0:  # a resumed run redoes the epochs after its checkpoint
        write_jsonl(log_uri, [r for r in read_jsonl(log_uri) if r["epoch"] < start])

    # The probe set, on every rank: under ZeRO-3 decoding gathers each layer from all of them.
    rows = read_rows(config["probe"], COLUMNS)
    with torch.no_grad():  # the vision encoder is frozen: its embeddings of the probe set, once
        embeds = encode_images(model, _pixels(rows, bundle.image_processor, device, model.vision_model.dtype))
    probe = Probe(rows, embeds, bundle.tokenizer, cfg, config["probe"]["heldout"], config["best"],
                  synced=ctx.get_world_size() > 1)

    before = None
    if start == 0:
        before, predicted = probe.caption(model, engine, scorer)
        if rank == 0:
            write_jsonl(log_uri, [probe.record(-1, 0, before, before, predicted)])
    elif rank == 0:  # a resumed run: the captions before training are in the log (else: generate's)
        before = next((r["probe_captions"] for r in read_jsonl(log_uri) if r["epoch"] == -1), probe.generated)
    now = None

    shard = ray.train.get_dataset_shard("train")
    progress = TrainProgress("finetune_blip", cfg.finetune.epochs, start, cfg.progress_s, config["steps_per_epoch"])
    for epoch in range(start, cfg.finetune.epochs):
        engine.train()
        records = []
        per_worker = training.per_worker(cfg, cfg.finetune.batch_size)
        for batch in shard.iter_batches(batch_size=per_worker, batch_format="numpy"):
            pixels = _pixels(batch, bundle.image_processor, device, model.vision_model.dtype)
            with torch.no_grad():
                embeds = encode_images(model, pixels)
            ids = caption_ids(model, bundle.tokenizer, [str(c) for c in batch["caption"]]).to(device)
            features, logits = decode_caption(model, embeds, ids, decoder=engine, layer=cfg.scorer.feature_layer)
            if reward_ranked:  # `caption` is each image's best candidate: learn to say it
                loss = caption_lm_loss(logits, ids, caption_token_mask(model, ids))
                record = {"epoch": epoch, "resumed_at_epoch": start if state else None, "loss_lm": loss.item()}
            else:
                ssim, psnr, clip = scorer.destandardize(scorer(features.float())).unbind(dim=1)
                loss = blip_loss(ssim, psnr, clip, weights)
                record = {"epoch": epoch, "resumed_at_epoch": start if state else None, "loss_blip": loss.item(),
                          "pred_ssim": ssim.mean().item(),
                          "pred_psnr": psnr.mean().item(), "pred_clip": clip.mean().item()}
            if reference is not None:
                with torch.no_grad():
                    pad = model.config.text_config.pad_token_id
                    ref_logits = reference(input_ids=ids, attention_mask=(ids != pad).long(),
                                           encoder_hidden_states=embeds, return_dict=True).logits
                kl = caption_kl(logits, ref_logits, caption_token_mask(model, ids))
                loss = loss + cfg.finetune.kl_weight * kl
                record["kl"] = kl.item()
            engine.backward(loss)
            engine.step()
            records.append({**record, "step": engine.global_steps, "loss": loss.item()})
            if rank == 0:
                progress.step(epoch, len(records), loss.item())
            training.maybe_fail(cfg, engine.global_steps, resumed=state is not None)
        if not training.still_owner(config["fence"]):
            return
        mean_loss = float(np.mean([r["loss"] for r in records])) if records else float("nan")
        now, predicted = probe.caption(model, engine, scorer)
        if rank == 0:
            probed = probe.record(epoch, engine.global_steps, now, before, predicted)
            write_jsonl(log_uri, [*read_jsonl(log_uri), *records, probed])
            progress.epoch(epoch, {"loss": mean_loss, "probe captions changed": probed["probe_changed"],
                                   "share of greedy = best candidate": probed.get("best_caption_share")})
        training.save_and_report(engine, {"epoch": epoch, "step": engine.global_steps, "loss": mean_loss},
                                 {"epoch": epoch})

    # The captions the trained decoder gives now, decoded in memory: the saved folder must give the same.
    if now is None:  # a rerun with no epoch left (every rank alike)
        now, _ = probe.caption(model, engine, scorer)
    engine.eval()
    probe_rows = probe.rows(before or now, now)

    # The fp32 master weights, gathered from every rank's partition (a collective: every rank
    # calls it; rank 0 keeps them). The half-precision copy would drop each update below
    # half an ulp.
    decoder_state = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if rank == 0:
            decoder_state[name] = full.detach().cpu()
    if rank == 0 and training.owner_log(config["fence"]).owns():  # the last write: checked once more
        original = load_captioner(config["captioner"], torch.device("cpu"))
        parameters = dict(original.model.text_decoder.named_parameters())
        with torch.no_grad():
            for name, value in decoder_state.items():
                parameters[name].copy_(value)
        with tempfile.TemporaryDirectory() as folder:  # from_pretrained-able, then to run_dir (maybe a bucket)
            for part in (original.model, original.tokenizer, original.image_processor):
                part.save_pretrained(folder)
            upload_dir(folder, config["blip_dir"])
        scorer_after = None if scorer is None else training.checksum(scorer)
        write_text(config["check_uri"], json.dumps({"scorer_before": scorer_before, "scorer_after": scorer_after,
                                                    "decoder": training.checksum(original.model.text_decoder),
                                                    "frozen_unchanged": training.checksum(model, skip="text_decoder.")
                                                    == frozen_before,
                                                    "steps": engine.global_steps, "probe": probe_rows,
                                                    "engine": training.engine_settings(engine)}))


def best_captions(cfg: Config, train_ids: list[str]) -> dict[str, dict] | None:
    """Each training image's best candidate by the real L_BLIP (`rayjobs.candidates`), of the
    images with candidate rows; None where the run has no `candidates/` (method `scorer`).

    reward_ranked trains on them: their rows must come from this run's settings (the number
    of candidates included) and every candidate of every training image be accounted for.
    The scorer method only measures against them: the same generate settings suffice."""
    candidates_dir = RunLayout(cfg.run_dir).candidates
    reward_ranked = cfg.finetune.method == "reward_ranked"
    if not is_dir(candidates_dir):
        if reward_ranked:
            raise ConfigError(f"{candidates_dir} is missing: run rayjobs.candidates first")
        return None
    fingerprint.check(candidates_dir, fingerprint.candidates(cfg) if reward_ranked else fingerprint.generate(cfg),
                      record=False)
    if reward_ranked:
        if not is_file(candidates_dir.success):  # a killed run's parts may still be staged
            raise ConfigError(f"{candidates_dir} is not complete: run rayjobs.candidates (again) first")
        done, n = CommitLog(candidates_dir).committed_ids(), cfg.caption.candidates
        missing = [i for i in train_ids if any(candidate_id(i, k) not in done for k in range(n))]
        if missing:
            raise ConfigError(f"{candidates_dir}: {len(missing)} of {len(train_ids)} training images lack some of "
                              f"their {n} candidates: run rayjobs.candidates (again) first")
    return best_candidates(read_candidates(candidates_dir, set(train_ids)), builders.loss_weights(cfg),
                           cfg.inpaint.caption_max_mask_area)


def with_captions(batch: dict, captions: dict[str, str]) -> dict:
    """CPU task: each row's `caption` replaced by its image's (the best candidate's)."""
    return {**batch, "caption": np.array([captions[str(i)] for i in batch["id"]], dtype=object)}


def run(cfg: Config) -> dict:
    run_layout = RunLayout(cfg.run_dir)
    out_dir, scorer_dir, samples = run_layout.finetune, run_layout.scorer_model, run_layout.generate.samples
    method = cfg.finetune.method
    if cfg.models.dtype == "fp16" and not cfg.train.use_gpu:
        # DeepSpeed trains in fp16 on GPUs only; falling back to fp32 silently would hide it.
        raise ConfigError("models.dtype=fp16 fine-tunes on GPUs only: set train.use_gpu=true (or models.dtype=bf16)")
    needed = ((scorer_dir, "rayjobs.train_scorer") if method == "scorer"
              else (run_layout.candidates, "rayjobs.candidates"))
    for path, step in ((samples, "rayjobs.generate"), needed):
        if not is_dir(path):
            raise ConfigError(f"{path} is missing: run {step} first")
    builders.fill_store(cfg)  # the captioner from the model store, never the hub
    # First, before anything waits for the cluster: the ranks of a run that is still going (its
    # driver killed, or the same command twice) stop writing here and free their resources.
    fence = (out_dir, CommitLog(out_dir).take_over())
    connect(cfg.ray_address, cfg.ray_progress)
    train_reads, val_reads = split_reads(cfg)
    train_ids = [i for r in train_reads for i in r["ids"]]
    # Every training image may be probed, whether or not it is trained on: the same probe set for both methods.
    probe = probe_set(cfg, train_reads, val_reads)
    best = best_captions(cfg, train_ids)
    ranked = {}
    if method == "reward_ranked":
        # Each image's caption becomes its best candidate's; an image whose candidates all
        # failed has none to learn, and is left out (counted in the report).
        ranked = {i: b["caption"] for i, b in best.items()}
        if not ranked:
            raise ConfigError(f"none of the {len(train_ids)} training images has a scored candidate "
                              f"(see {run_layout.candidates.errors}): nothing to fine-tune on")
        train_reads = [{"path": r["path"], "ids": chosen} for r in train_reads
                       if (chosen := [i for i in r["ids"] if i in ranked])]
        log.info("reward_ranked: %d training images, %d with a best candidate", len(train_ids), len(ranked))
    train = read_committed(train_reads, COLUMNS, cfg.generate.read.num_cpus)
    if ranked:
        train = train.map_batches(with_captions, fn_kwargs={"captions": ranked}, batch_size=None,
                                  num_cpus=cfg.generate.read.num_cpus)
    log.info("batch of %d per optimizer step: %d on each of %d workers", cfg.finetune.batch_size,
             training.per_worker(cfg, cfg.finetune.batch_size), cfg.train.num_workers)
    write_text(out_dir.config, to_yaml(cfg))
    trainer = training.make_trainer(
        finetune_loop,
        {"cfg": cfg, "captioner": builders.resolve_preset(cfg).captioner, "scorer_dir": scorer_dir, "fence": fence,
         "probe": probe,
         "best": None if best is None else {i: best[i]["caption"] for ids in probe["ids"] for i in ids if i in best},
         "steps_per_epoch": math.ceil(sum(len(r["ids"]) for r in train_reads) / cfg.finetune.batch_size),
         "log_uri": out_dir.metrics, "blip_dir": run_layout.blip, "check_uri": run_layout.finetune_check},
        cfg, name="finetune_blip", storage=out_dir.ray_train, datasets={"train": train},
    )
    training.fit(trainer, cfg, fence)
    records = read_jsonl(out_dir.metrics)
    probes = [r for r in records if "probe_changed" in r]
    records = [r for r in records if "loss" in r]
    series = {"loss": ("L_BLIP" if method == "scorer" else "LM loss on the best candidates")
              + (" (+ KL)" if cfg.finetune.kl_weight > 0 else "")}
    plot_curves(records, "step", series, "BLIP fine-tuning loss (per step, rank 0)", out_dir / "loss.png")
    if cfg.train.tensorboard:
        write_tensorboard(records, "step", out_dir / "tensorboard")
    plot_curves(probes, "epoch", {"probe_changed": "captions changed", "probe_changed_heldout": "... of them held out",
                                  "probe_edit_distance": "mean token edit distance"},
                f"probe set ({2 * cfg.finetune.probe_size} images at most): captions against those before "
                "training (epoch -1)", out_dir / "probe.png")
    check = json.loads(read_text(run_layout.finetune_check))
    report = {"method": method, "steps": check["steps"], "engine": check["engine"],
              "scorer_unchanged": (check["scorer_before"] == check["scorer_after"]
                                   if check["scorer_before"] is not None else None),  # None: no scorer used
              "frozen_unchanged": check["frozen_unchanged"], "probe": check["probe"],
              "probe_changed": sum(r["caption"] != r["fine_tuned"] for r in check["probe"]),
              "probe_changed_heldout": sum(r["caption"] != r["fine_tuned"] for r in check["probe"] if r["heldout"]),
              "probe_by_epoch": [{k: v for k, v in r.items() if k != "probe_captions"} for r in probes],
              "first_loss": records[0]["loss"] if records else None,
              "last_loss": records[-1]["loss"] if records else None, "blip_dir": run_layout.blip}
    if method == "reward_ranked":
        report["reward_ranked"] = {"training_images": len(train_ids), "trained_on": len(ranked),
                                   "left_out_without_candidates": len(train_ids) - len(ranked),
                                   "best_is_greedy": sum(b["candidate"] == 0 for b in best.values())}
    if best is not None:
        # Over the probe set's training images with candidates: how often greedy decoding
        # gives the best candidate, before fine-tuning and after.
        rows = [r for r in check["probe"] if r["id"] in best]
        targets = [best[r["id"]]["caption"] for r in rows]
        before = best_share([r["caption"] for r in rows], targets)
        after = best_share([r["fine_tuned"] for r in rows], targets)
        report["best_caption_share"] = {"before": before["best_caption_share"],
                                        "after": after["best_caption_share"], "images": len(rows)}
    write_text(out_dir.report, json.dumps(report, indent=2))
    training.owner_log(fence).release()
    return report


def main(argv: list[str] | None = None) -> int:
    return job_main("finetune_blip", __doc__, run, print_report, argv)


def print_report(report: dict) -> None:
    losses = (f" (loss {report['first_loss']:.4f} -> {report['last_loss']:.4f})"
              if report["first_loss"] is not None else "")
    print(f"\nfine-tuned BLIP ({report['method']}) in {report['blip_dir']} after {report['steps']} steps{losses}; "
          f"{report['probe_changed']} of {len(report['probe'])} probe captions changed "
          f"({report['probe_changed_heldout']} of them held out)")
    if "reward_ranked" in report:
        r = report["reward_ranked"]
        print(f"trained on the best candidate of {r['trained_on']} of {r['training_images']} training images "
              f"({r['left_out_without_candidates']} left out: no scored candidate; the greedy caption was already "
              f"the best for {r['best_is_greedy']})")
    share = report.get("best_caption_share")
    if share is not None:
        def pct(x):
            return "n/a" if x is None else f"{100 * x:.0f} %"
        print(f"greedy caption = best candidate on {pct(share['before'])} of {share['images']} probe training "
              f"images before fine-tuning, {pct(share['after'])} after")


if __name__ == "__main__":
    sys.exit(main())
