"""The stages of the variants the evaluate job adds to generate's two.

The fine-tuned BLIP's caption (and, with `caption.candidates` above 1, the scorer-reranked
one) is each inpainted and scored again only where it differs from the original BLIP's
caption; elsewhere the variant reuses the BLIP variant's image and scores. Plain callables
for the job's actor pools.
"""

from __future__ import annotations

import functools

import numpy as np

from blipinpaint import builders
from blipinpaint.batches import take
from blipinpaint.config import Config
from blipinpaint.evaluation import VARIANTS, Variant
from blipinpaint.io import decode_png
from blipinpaint.layout import RunLayout
from blipinpaint.models import ModelRef
from blipinpaint.records import METRICS
from blipinpaint.storage import local_dir

# The variants the evaluate job adds to generate's two: each differs from the BLIP variant by its caption alone.
ADDED = ("finetuned", "reranked")


class Chain:
    """Stage: `stages` one after the other, in one actor."""

    def __init__(self, stages: list):
        self.stages = stages

    def __call__(self, batch: dict) -> dict:
        for stage in self.stages:
            batch = stage(batch)
        return batch


def _image(variant: Variant) -> str:
    """The variant's image column in the stream (its PNG column before encoding)."""
    return variant.image.removesuffix("_png")


class OnlyChanged:
    """Stage: runs `stage` on the rows whose `caption` column differs from BLIP's caption;
    `reuse` gives the others the BLIP variant's outputs. An added variant then differs from
    the BLIP variant by its prompt alone: inpainted again from the same noise, an unchanged
    caption would still come out slightly different wherever kernels are not batch-invariant
    (fp16 on GPUs), and it would cost a third of this job's inpainting for nothing."""

    def __init__(self, stage, reuse, caption: str = VARIANTS["finetuned"].caption):
        self.stage, self.reuse, self.caption = stage, reuse, caption

    def __call__(self, batch: dict) -> dict:
        changed = np.array([a != b for a, b in zip(batch[self.caption], batch["caption"])], dtype=bool)
        if changed.all():
            return self.stage(batch)
        if not changed.any():
            return self.reuse(batch)
        parts = [self.stage(take(batch, changed)), self.reuse(take(batch, ~changed))]
        order = np.argsort(np.concatenate([np.flatnonzero(changed), np.flatnonzero(~changed)]), kind="stable")
        return {k: np.concatenate([np.asarray(p[k]) for p in parts])[order] for k in parts[0]}


def reuse_inpainting(rows: dict, variant: Variant = VARIANTS["finetuned"]) -> dict:
    return {**rows, _image(variant): np.stack([decode_png(b) for b in rows["inpainted_png"]])}


def reuse_metrics(rows: dict, variant: Variant = VARIANTS["finetuned"]) -> dict:
    return {**rows, **{m + variant.suffix: np.asarray(rows[m]) for m in METRICS}}


def build_added_captioners(cfg: Config) -> Chain:
    """The fine-tuned BLIP's caption; with `caption.candidates` above 1, the reranked one too."""
    run_layout = RunLayout(cfg.run_dir)
    stages = [builders.build_captioner(cfg, ModelRef(local_dir(run_layout.blip)),
                                       output=VARIANTS["finetuned"].caption)]
    if cfg.caption.candidates > 1:
        stages.append(builders.build_reranker(cfg, run_layout.scorer_model))
    return Chain(stages)


def build_added_inpainters(cfg: Config, added: list[Variant]) -> Chain:
    """An `OnlyChanged` inpainter per added variant, all on one pipeline."""
    inpainter = builders.build_inpainter(cfg, {})
    return Chain([OnlyChanged(inpainter.with_prompts({_image(v): v.caption}),
                              functools.partial(reuse_inpainting, variant=v), v.caption) for v in added])


def build_added_metrics(cfg: Config, added: list[Variant]) -> Chain:
    """An `OnlyChanged` metrics stage per added variant, all with one CLIP."""
    metrics = builders.build_metrics(cfg)
    return Chain([OnlyChanged(metrics.with_variants({v.suffix: (_image(v), v.caption)}),
                              functools.partial(reuse_metrics, variant=v), v.caption) for v in added])
