"""Fine-tune BLIP's text decoder through the frozen scoring network.

    python -m rayjobs.finetune_blip [--config CONFIG.yaml] [dotted.key=value ...]

On a cluster (the tunnel, the token, logs and stop: docs/cluster.md):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.finetune_blip --config configs/paper-coco.yaml

Only the text decoder trains, on Ray Train DeepSpeed ZeRO workers, by the loss of
`finetune.method`: `scorer` (the paper's) minimises L_BLIP on the frozen scorer's predictions
from each training caption's decoder states; `reward_ranked` the language-model loss of each
image's best candidate (`rayjobs.candidates`). The probe set (`blipinpaint.probe`) shows the
captions changing epoch by epoch. Writes `run_dir/blip/` (a Hugging Face folder) and
`run_dir/finetune/` (`metrics.jsonl`, `check.json`, `report.json`, plots, `config.yaml`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import torch

from blipinpaint import builders, fingerprint
from blipinpaint.candidates import best_captions
from blipinpaint.captioning import caption_ids, decode_caption, encode_images
from blipinpaint.commit_log import CommitLog
from blipinpaint.config import Config, to_yaml
from blipinpaint.errors import ConfigError
from blipinpaint.layout import RunLayout
from blipinpaint.masks import masked_pixels
from blipinpaint.models import CaptionerModel, ModelRef, load_captioner
from blipinpaint.models.loading import DTYPES, write_blip
from blipinpaint.objectives import Loss, lm_loss, scorer_loss, with_kl
from blipinpaint.plots import plot_curves, write_tensorboard
from blipinpaint.precision import survival_line, surviving_changes
from blipinpaint.probe import Probe, best_share_change, changed_counts, probe_set
from blipinpaint.reader import read_rows, split_reads
from blipinpaint.records import decode_images
from blipinpaint.scorer import ScoreNet
from blipinpaint.storage import is_file, local_dir, read_jsonl, read_text, write_jsonl, write_text
from rayjobs import training
from rayjobs.cli import job_main
from rayjobs.cluster import connect
from rayjobs.progress import TrainProgress
from rayjobs.stream import TASK_RETRIES, read_committed

log = logging.getLogger("blipinpaint.finetune_blip")
COLUMNS = ["id", "caption", "image_png", "mask_png"]


@dataclass
class Parts:
    """What one rank fine-tunes with: the captioner, whose text decoder trains inside `engine`
    (DeepSpeed's) while the rest stays frozen, and the digests of what must not change."""

    bundle: CaptionerModel
    engine: torch.nn.Module
    scorer: ScoreNet | None  # frozen; None for reward_ranked, which has no need of one
    reference: torch.nn.Module | None  # the decoder as it was, for the KL term (None: no KL term)
    device: torch.device
    rank: int
    scorer_before: str | None
    frozen_before: str  # everything but the text decoder, in the dtype it runs in
    # The probe decodes as evaluate will, in `caption.decoder_dtype`. Where the engine trains
    # in another precision, every rank gathers the fp32 masters before each probe and rank 0
    # decodes with its copy of the decoder in that dtype (`probe_decoder`; None elsewhere).
    separate_probe: bool = False
    probe_decoder: torch.nn.Module | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model


def _pixels(batch: dict, image_processor, device, dtype) -> torch.Tensor:
    rows = decode_images(batch)
    visible = masked_pixels(rows["image"], rows["mask"])  # the captioner never sees the hole
    return image_processor(images=list(visible), return_tensors="pt").pixel_values.to(device, dtype)


def build_parts(cfg: Config, captioner: ModelRef, rank: int, device: torch.device) -> Parts:
    """The captioner with its text decoder in a DeepSpeed engine (in `models.dtype`, its fp32
    masters the exact original weights), the frozen scorer and the KL reference."""
    bundle = load_captioner(captioner, device)
    model = bundle.model
    model.requires_grad_(False)
    model.text_decoder.requires_grad_(True)
    scorer = (None if cfg.finetune.method == "reward_ranked" else
              ScoreNet.from_pretrained(local_dir(RunLayout(cfg.run_dir).scorer_model)).to(device).requires_grad_(False))
    scorer_before = None if scorer is None else training.checksum(scorer)
    # Copied before DeepSpeed partitions (ZeRO-3) and casts the decoder; cast with it below.
    reference = copy.deepcopy(model.text_decoder).requires_grad_(False) if cfg.finetune.kl_weight > 0 else None
    half = training.half_dtype(cfg)
    # The fp32 weights, before DeepSpeed casts the decoder to `half` (see below).
    initial = {name: param.detach().clone() for name, param in model.text_decoder.named_parameters()} if half else {}
    evaluated = builders.decoder_dtype(cfg)
    separate = evaluated != (half or torch.float32)
    probe_decoder = (copy.deepcopy(model.text_decoder).to(evaluated).requires_grad_(False).eval()
                     if separate and rank == 0 else None)
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
    return Parts(bundle, engine, scorer, reference, device, rank, scorer_before,
                 frozen_before=training.checksum(model, skip="text_decoder."), separate_probe=separate,
                 probe_decoder=probe_decoder)


def pick_loss(cfg: Config, parts: Parts) -> Loss:
    """The loss of `finetune.method`, plus the KL term to the original decoder when `finetune.kl_weight` > 0."""
    loss = (lm_loss(parts.model) if cfg.finetune.method == "reward_ranked"
            else scorer_loss(parts.scorer, builders.loss_weights(cfg)))
    return loss if parts.reference is None else with_kl(loss, parts.model, parts.reference, cfg.finetune.kl_weight)


def build_probe(cfg: Config, config: dict, parts: Parts, synced: bool) -> Probe:
    """The probe set on this rank (on every rank: under ZeRO-3 decoding gathers each layer from all)."""
    rows = read_rows(config["probe"], COLUMNS)
    with torch.no_grad():  # the vision encoder is frozen: its embeddings of the probe set, once
        embeds = encode_images(parts.model, _pixels(rows, parts.bundle.image_processor, parts.device,
                                                    parts.model.vision_model.dtype))
    return Probe(rows, embeds, parts.bundle.tokenizer, cfg, config["probe"]["heldout"], config["best"], synced=synced)


def probe_captions(probe: Probe, parts: Parts) -> tuple[list[str], list[float]]:
    """The probe set's captions and the scorer's predictions for them, from the decoder as
    trained so far, in `caption.decoder_dtype` (every rank calls it; with a separate probe
    decoder, rank 0 alone decodes and the others get nothing)."""
    if not parts.separate_probe:
        return probe.caption(parts.model, parts.engine, parts.scorer)
    masters = training.gather_fp32_masters(parts.engine)  # a collective
    if parts.rank != 0:
        return [], []
    with torch.no_grad():
        for name, param in parts.probe_decoder.named_parameters():
            param.copy_(masters[name])
    return probe.caption(parts.model, parts.engine, parts.scorer, decoder=parts.probe_decoder)


def probe_before(probe: Probe, parts: Parts, start: int, log_uri: str) -> list[str] | None:
    """The probe set's captions before training, on rank 0 (None elsewhere on a resumed run):
    decoded and logged on a fresh run, else read from the log (failing that, generate's)."""
    if start == 0:
        before, predicted = probe_captions(probe, parts)
        if parts.rank == 0:
            write_jsonl(log_uri, [{**probe.record(-1, 0, before, before, predicted),
                                   **training.loss_scaling(parts.engine)}])
        return before
    return (next((r["probe_captions"] for r in read_jsonl(log_uri) if r["epoch"] == -1), probe.generated)
            if parts.rank == 0 else None)


def train_epoch(cfg: Config, parts: Parts, loss: Loss, shard, epoch: int, resumed_at: int | None,
                progress: TrainProgress) -> list[dict]:
    """One pass over this rank's shard, one optimizer step a batch: the steps' log records."""
    model, engine = parts.model, parts.engine
    engine.train()
    records = []
    per_worker = training.per_worker(cfg, cfg.finetune.batch_size)
    for batch in shard.iter_batches(batch_size=per_worker, batch_format="numpy"):
        pixels = _pixels(batch, parts.bundle.image_processor, parts.device, model.vision_model.dtype)
        with torch.no_grad():
            embeds = encode_images(model, pixels)
        ids = caption_ids(model, parts.bundle.tokenizer, [str(c) for c in batch["caption"]]).to(parts.device)
        features, logits = decode_caption(model, embeds, ids, decoder=engine, layer=cfg.scorer.feature_layer)
        value, figures = loss(ids, embeds, features, logits)
        engine.backward(value)
        engine.step()
        records.append({"epoch": epoch, "resumed_at_epoch": resumed_at, **figures, "step": engine.global_steps,
                        "loss": value.item()})
        if parts.rank == 0:
            progress.step(epoch, len(records), value.item())
        training.maybe_fail(cfg, engine.global_steps, resumed=resumed_at is not None)
    return records


def close_epoch(parts: Parts, probe: Probe, before: list[str] | None, records: list[dict], epoch: int,
                log_uri: str, progress: TrainProgress) -> list[str]:
    """After an epoch: the probe set captioned, rank 0's log lines, every rank's checkpoint.
    The probe's captions now."""
    engine = parts.engine
    mean_loss = float(np.mean([r["loss"] for r in records])) if records else float("nan")
    now, predicted = probe_captions(probe, parts)
    if parts.rank == 0:  # the epoch's line: the probe's figures, and the steps DeepSpeed skipped so far
        probed = {**probe.record(epoch, engine.global_steps, now, before, predicted),
                  **training.loss_scaling(engine)}
        write_jsonl(log_uri, [*read_jsonl(log_uri), *records, probed])
        progress.epoch(epoch, {"loss": mean_loss, "probe captions changed": probed["probe_changed"],
                               "share of greedy = best candidate": probed.get("best_caption_share")})
    training.save_and_report(engine, {"epoch": epoch, "step": engine.global_steps, "loss": mean_loss},
                             {"epoch": epoch})
    return now


def save(parts: Parts, config: dict, probe_rows: list[dict]) -> None:
    """The trained decoder's fp32 masters gathered (every rank), then on rank 0, while this
    run still owns its folder, `run_dir/blip/` and `finetune/check.json`: with digests of the
    masters and of the engine's own (maybe half-precision) weights, what a saved folder must
    reload as, and how many of the changes survive `caption.decoder_dtype`."""
    cfg: Config = config["cfg"]
    decoder_state = training.gather_fp32_masters(parts.engine)
    module = training.module_digest(parts.engine)  # a collective too
    if parts.rank != 0 or not training.owner_log(config["fence"]).owns():  # the last write: checked once more
        return
    run_layout = RunLayout(cfg.run_dir)
    original = load_captioner(config["captioner"], torch.device("cpu"))
    survival = surviving_changes(dict(original.model.text_decoder.named_parameters()), decoder_state,
                                 DTYPES[cfg.caption.decoder_dtype])
    decoder = write_blip(original, decoder_state, run_layout.blip)
    scorer_after = None if parts.scorer is None else training.checksum(parts.scorer)
    write_text(run_layout.finetune_check, json.dumps({
        "scorer_before": parts.scorer_before, "scorer_after": scorer_after, "decoder": training.checksum(decoder),
        "masters": training.digest(decoder_state), "module": module, "decoder_precision": survival,
        "frozen_unchanged": training.checksum(parts.model, skip="text_decoder.") == parts.frozen_before,
        "steps": parts.engine.global_steps, **training.loss_scaling(parts.engine), "probe": probe_rows,
        "engine": training.engine_settings(parts.engine)}))


def finetune_loop(config: dict) -> None:
    cfg: Config = config["cfg"]
    context = ray.train.get_context()
    log_uri = RunLayout(cfg.run_dir).finetune.metrics
    torch.manual_seed(cfg.seed)
    parts = build_parts(cfg, config["captioner"], context.get_world_rank(), ray.train.torch.get_device())
    state = training.restore(parts.engine)
    if not training.still_owner(config["fence"]):  # a straggler of a run taken over
        return
    start = state["epoch"] + 1 if state else 0
    if parts.rank == 0 and start > 0:  # a resumed run redoes the epochs after its checkpoint
        write_jsonl(log_uri, [r for r in read_jsonl(log_uri) if r["epoch"] < start])
    probe = build_probe(cfg, config, parts, synced=context.get_world_size() > 1)
    before = probe_before(probe, parts, start, log_uri)
    loss = pick_loss(cfg, parts)

    shard = ray.train.get_dataset_shard("train")
    progress = TrainProgress("finetune_blip", cfg.finetune.epochs, start, cfg.progress_s, config["steps_per_epoch"])
    now = None
    for epoch in range(start, cfg.finetune.epochs):
        records = train_epoch(cfg, parts, loss, shard, epoch, start if state else None, progress)
        if not training.still_owner(config["fence"]):
            return
        now = close_epoch(parts, probe, before, records, epoch, log_uri, progress)

    # The captions the trained decoder gives now, decoded in memory: the saved folder must give the same.
    if now is None:  # a rerun with no epoch left (every rank alike)
        now, _ = probe_captions(probe, parts)
    parts.engine.eval()
    save(parts, config, probe.rows(before or now, now))


def with_captions(batch: dict, captions: dict[str, str]) -> dict:
    """CPU task: each row's `caption` replaced by its image's (the best candidate's)."""
    return {**batch, "caption": np.array([captions[str(i)] for i in batch["id"]], dtype=object)}


def run(cfg: Config) -> dict:
    run_layout = RunLayout(cfg.run_dir)
    out_dir = run_layout.finetune
    method = cfg.finetune.method
    if cfg.models.dtype == "fp16" and not cfg.train.use_gpu:
        # DeepSpeed trains in fp16 on GPUs only; falling back to fp32 silently would hide it.
        raise ConfigError("models.dtype=fp16 fine-tunes on GPUs only: set train.use_gpu=true (or models.dtype=bf16)")
    # What it reads, each finished (`_SUCCESS`): a step cut short leaves outputs that look whole.
    needed = ((run_layout.scorer, "rayjobs.train_scorer") if method == "scorer"
              else (run_layout.candidates, "rayjobs.candidates"))
    for folder, step in ((run_layout.generate, "rayjobs.generate"), needed):
        if not is_file(folder.success):
            raise ConfigError(f"{folder} is not complete (no _SUCCESS): run {step} (again) first")
    builders.fill_store(cfg)  # the captioner from the model store, never the hub
    train_reads, val_reads = split_reads(cfg)
    train_ids = [i for r in train_reads for i in r["ids"]]
    # The candidates checked before anything is written.
    best = best_captions(cfg, train_ids, builders.loss_weights(cfg))
    # Every training image may be probed, whether or not it is trained on: the same probe set for both methods.
    probe = probe_set(cfg, train_reads, val_reads)
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
    # The folders are this run's only if they hold this fingerprint (or, with `restart`, are moved aside).
    current = fingerprint.finetune(cfg)
    fingerprint.claim(cfg, "finetune", (out_dir, run_layout.blip), current)
    # Then, before anything waits for the cluster: the ranks of a run that is still going (its
    # driver killed, or the same command twice) stop writing here and free their resources.
    fence = (out_dir, CommitLog(out_dir).take_over())
    connect(cfg.ray_address, cfg.ray_progress)
    train = read_committed(train_reads, COLUMNS, cfg.stream.read.num_cpus)
    if ranked:
        train = train.map_batches(with_captions, fn_kwargs={"captions": ranked}, batch_size=None,
                                  num_cpus=cfg.stream.read.num_cpus, max_retries=TASK_RETRIES)
    log.info("batch of %d per optimizer step: %d on each of %d workers", cfg.finetune.batch_size,
             training.per_worker(cfg, cfg.finetune.batch_size), cfg.train.num_workers)
    write_text(out_dir.config, to_yaml(cfg))
    trainer = training.make_trainer(
        finetune_loop,
        {"cfg": cfg, "captioner": builders.resolve_preset(cfg).captioner, "fence": fence, "probe": probe,
         "best": None if best is None else {i: best[i]["caption"] for ids in probe["ids"] for i in ids if i in best},
         "steps_per_epoch": math.ceil(sum(len(r["ids"]) for r in train_reads) / cfg.finetune.batch_size)},
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
    training.check_trained("finetune_blip", check["steps"], check["skipped_steps"], check["loss_scale"],
                           out_dir.metrics)
    report = {"method": method, "steps": check["steps"], "skipped_steps": check["skipped_steps"],
              "loss_scale": check["loss_scale"], "engine": check["engine"],
              "decoder_precision": check["decoder_precision"],
              "scorer_unchanged": (check["scorer_before"] == check["scorer_after"]
                                   if check["scorer_before"] is not None else None),  # None: no scorer used
              "frozen_unchanged": check["frozen_unchanged"], "probe": check["probe"], **changed_counts(check["probe"]),
              "probe_by_epoch": [{k: v for k, v in r.items() if k != "probe_captions"} for r in probes],
              "first_loss": records[0]["loss"] if records else None,
              "last_loss": records[-1]["loss"] if records else None, "blip_dir": run_layout.blip}
    if method == "reward_ranked":
        report["reward_ranked"] = {"training_images": len(train_ids), "trained_on": len(ranked),
                                   "left_out_without_candidates": len(train_ids) - len(ranked),
                                   "best_is_greedy": sum(b["candidate"] == 0 for b in best.values())}
    if best is not None:
        report["best_caption_share"] = best_share_change(check["probe"], {i: b["caption"] for i, b in best.items()})
    report["fingerprint"] = current
    write_text(out_dir.report, json.dumps(report, indent=2))
    fingerprint.finish(out_dir, current)  # last: BLIP is fine-tuned, under these settings and inputs
    training.owner_log(fence).release()
    return report


def main(argv: list[str] | None = None) -> int:
    return job_main("finetune_blip", __doc__, run, print_report, argv)


def print_report(report: dict) -> None:
    losses = (f" (loss {report['first_loss']:.4f} -> {report['last_loss']:.4f})"
              if report["first_loss"] is not None else "")
    skipped = f", {report['skipped_steps']} of them skipped by DeepSpeed" if report["skipped_steps"] else ""
    print(f"\nfine-tuned BLIP ({report['method']}) in {report['blip_dir']} after {report['steps']} steps{skipped}"
          f"{losses}; {report['probe_changed']} of {len(report['probe'])} probe captions changed "
          f"({report['probe_changed_heldout']} of them held out)")
    print(survival_line(report["decoder_precision"]))
    if "reward_ranked" in report:
        ranked = report["reward_ranked"]
        print(f"trained on the best candidate of {ranked['trained_on']} of {ranked['training_images']} training "
              f"images ({ranked['left_out_without_candidates']} left out: no scored candidate; the greedy caption "
              f"was already the best for {ranked['best_is_greedy']})")
    share = report.get("best_caption_share")
    if share is not None:
        def pct(fraction):
            return "n/a" if fraction is None else f"{100 * fraction:.0f} %"
        print(f"greedy caption = best candidate on {pct(share['before'])} of {share['images']} probe training "
              f"images before fine-tuning, {pct(share['after'])} after")


if __name__ == "__main__":
    sys.exit(main())
