"""The probe set: a few fixed images that fine-tuning captions before training and after each epoch.

Training and held-out images alike, picked by a hash of each id, so every run of the same data
probes the same ones. A `Probe` holds what captioning them takes on one rank (the frozen
encoder's embeddings, the tokenizer) and turns its captions into the fine-tuning log's
records: how many changed since before training, by how many tokens, what the frozen scorer
predicts for them, and how many equal their image's best candidate.
"""

from __future__ import annotations

import numpy as np
import torch

from blipinpaint.captioning import caption_ids, caption_texts, decode_caption, edit_distance, generate_captions
from blipinpaint.config import Config
from blipinpaint.scorer import ScoreNet
from blipinpaint.seeds import sample_seed


def probe_set(cfg: Config, train_reads: list[dict], val_reads: list[dict]) -> dict:
    """`finetune.probe_size` training and as many held-out ids, chosen by a hash of each id (the
    same in every run), as a `read_rows` batch, and which of them are held out."""
    def pick(reads):
        ids = sorted((i for r in reads for i in r["ids"]), key=lambda i: sample_seed(cfg.seed, i, "probe"))
        return set(ids[: cfg.finetune.probe_size])

    train, held = pick(train_reads), pick(val_reads)
    reads = [(r["path"], sorted(set(r["ids"]) & (train | held))) for r in (*train_reads, *val_reads)]
    reads = [(path, ids) for path, ids in reads if ids]
    return {"path": [p for p, _ in reads], "ids": [i for _, i in reads], "heldout": sorted(held)}


def probe_record(epoch: int, step: int, captions: list[str], before: list[str], heldout: list[bool],
                 tokenize, predicted: list[float], best: list[str | None] | None = None) -> dict:
    """What fine-tuning did to the probe set's captions so far (`before`: before training);
    with `best` (each probe image's best candidate, None where it has none), how many of
    them the greedy caption now equals (`best_caption_share`)."""
    changed = [a != b for a, b in zip(captions, before)]
    return {"epoch": epoch, "step": step, "probe_changed": sum(changed),
            "probe_changed_heldout": sum(c and h for c, h in zip(changed, heldout)),
            "probe_edit_distance": float(np.mean([edit_distance(tokenize(a), tokenize(b))
                                                  for a, b in zip(captions, before)])),
            **{f"probe_pred_{name}": value for name, value in zip(("ssim", "psnr", "clip"), predicted)},
            **({} if best is None else best_share(captions, best)),
            "probe_captions": captions}


def best_share(captions: list[str], best: list[str | None]) -> dict:
    """The share of images with a best candidate (`best`, None elsewhere) whose caption equals it."""
    pairs = [(c, b) for c, b in zip(captions, best) if b is not None]
    return {"best_caption_share": sum(c == b for c, b in pairs) / len(pairs) if pairs else None,
            "best_caption_images": len(pairs)}


def changed_counts(rows: list[dict]) -> dict:
    """How many of the probe images' captions (`Probe.rows`) fine-tuning changed, and how many of them held out."""
    return {"probe_changed": sum(r["caption"] != r["fine_tuned"] for r in rows),
            "probe_changed_heldout": sum(r["caption"] != r["fine_tuned"] for r in rows if r["heldout"])}


def best_share_change(rows: list[dict], best: dict[str, str]) -> dict:
    """Over the probe images (`Probe.rows`) with a best candidate (`best`, by id): how often
    the greedy caption is that candidate, before fine-tuning and after."""
    rows = [r for r in rows if r["id"] in best]
    targets = [best[r["id"]] for r in rows]
    return {"before": best_share([r["caption"] for r in rows], targets)["best_caption_share"],
            "after": best_share([r["fine_tuned"] for r in rows], targets)["best_caption_share"], "images": len(rows)}


class Probe:
    """The probe set on one rank, built once from its rows (`read_rows` of `probe_set`).

    `image_embeds`: the frozen vision encoder's states of the rows' masked images; `heldout`:
    the held-out ids; `best`: each training image's best candidate, by id (None: the run has
    no candidates). `synced`: several ranks decode together (ZeRO-3 gathers each layer's
    weights from every rank at every step, so every rank must call `caption`)."""

    def __init__(self, rows: dict, image_embeds: torch.Tensor, tokenizer, cfg: Config, heldout: list[str],
                 best: dict[str, str] | None = None, synced: bool = False):
        self.ids = [str(i) for i in rows["id"]]
        self.generated = [str(c) for c in rows["caption"]]  # generate's captions of them
        held = set(heldout)
        self.heldout = [i in held for i in self.ids]
        self.best = None if best is None else [best.get(i) for i in self.ids]
        self.image_embeds = image_embeds
        self.tokenizer = tokenizer
        self.max_new_tokens, self.num_beams = cfg.caption.max_new_tokens, cfg.caption.num_beams
        self.feature_layer = cfg.scorer.feature_layer
        self.synced = synced

    def tokenize(self, caption: str) -> list[int]:
        return self.tokenizer(caption, add_special_tokens=False).input_ids

    @torch.no_grad()
    def caption(self, model, engine: torch.nn.Module, scorer: ScoreNet | None = None,
                decoder: torch.nn.Module | None = None) -> tuple[list[str], list[float]]:
        """The probe set's captions as generation decodes them (greedy, or beam search), from
        `model` as it is now, and the scorer's mean prediction (SSIM, PSNR, CLIP) for them (none
        without a scorer). `engine`: the text decoder as wrapped for training, in eval mode
        meanwhile and in train mode after; `decoder`: a plain copy of it to decode with
        instead (in the evaluation's precision: this rank alone decodes then)."""
        engine.eval()
        generator, synced = (model.text_decoder, self.synced) if decoder is None else (decoder, False)
        ids = generate_captions(model, self.image_embeds, decoder=generator, max_new_tokens=self.max_new_tokens,
                                num_beams=self.num_beams, do_sample=False, synced_gpus=synced)
        captions = caption_texts(self.tokenizer, ids)
        predicted = []
        if scorer is not None:
            caption_tokens = caption_ids(model, self.tokenizer, captions).to(self.image_embeds.device)
            features, _ = decode_caption(model, self.image_embeds, caption_tokens, decoder=decoder or engine,
                                         layer=self.feature_layer)
            predicted = scorer.destandardize(scorer(features.float())).mean(dim=0).tolist()
        engine.train()
        return captions, predicted

    def record(self, epoch: int, step: int, captions: list[str], before: list[str], predicted: list[float]) -> dict:
        """The log's probe record after `epoch` (-1: before training), against the captions `before` training."""
        return probe_record(epoch, step, captions, before, self.heldout, self.tokenize, predicted, self.best)

    def rows(self, before: list[str], fine_tuned: list[str]) -> list[dict]:
        """One row per probe image: its id, whether it is held out, its captions before and after training."""
        return [{"id": i, "heldout": h, "caption": b, "fine_tuned": a}
                for i, h, b, a in zip(self.ids, self.heldout, before, fine_tuned)]
