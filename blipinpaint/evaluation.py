"""The paper's evaluation as figures: variants, mask-area buckets, summaries, intervals.

Three inpaintings of each held-out sample, from the same noise: the baseline (no text),
guided by the original BLIP's caption, and guided by the fine-tuned BLIP's caption; a
fourth with `caption.candidates` above 1, guided by the caption the frozen scorer picked
among the original BLIP's candidates. Each is scored by FID against the ground-truth
images, CLIP score against the caption that guided it (the baseline, which had none,
against the original BLIP's caption), and SSIM/PSNR against the ground truth; overall and
per mask-area bucket. `report_tables` and `report_markdown` turn these figures into text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from blipinpaint.bootstrap import mean_intervals, statistic_intervals
from blipinpaint.fid import fid_draw
from blipinpaint.records import METRICS


@dataclass(frozen=True)
class Variant:
    label: str  # as in the report's table
    short: str  # in plot legends
    suffix: str  # of its metric columns
    image: str  # its PNG column
    caption: str | None  # the caption column that guided it


VARIANTS = {
    "baseline": Variant("Stable Diffusion, no text (baseline)", "baseline (no text)", "_baseline",
                        "inpainted_baseline_png", None),
    "blip": Variant("+ BLIP caption", "BLIP caption", "", "inpainted_png", "caption"),
    "finetuned": Variant("+ fine-tuned BLIP caption", "fine-tuned BLIP caption", "_finetuned",
                         "inpainted_finetuned_png", "caption_finetuned"),
    # Only with `caption.candidates` above 1: an evaluation holds the variants its rows have.
    "reranked": Variant("+ scorer-reranked caption", "scorer-reranked caption", "_reranked",
                        "inpainted_reranked_png", "caption_reranked"),
}
# The paired comparisons: (variant, minus variant), per sample.
DELTAS = {"blip_vs_baseline": ("blip", "baseline"), "finetuned_vs_blip": ("finetuned", "blip"),
          "reranked_vs_blip": ("reranked", "blip")}
DELTA_LABELS = {"blip_vs_baseline": "BLIP − baseline", "finetuned_vs_blip": "fine-tuned − BLIP",
                "reranked_vs_blip": "reranked − BLIP"}
PAIRED = ("clip_score", "ssim", "psnr")  # the metrics with a bootstrap interval
REAL = "ground_truth"
ALL = "all"


def variants_in(names) -> dict[str, Variant]:
    """The variants among `names` (variant names, or the metric columns of evaluated rows),
    in the report's order."""
    names = set(names)
    return {k: v for k, v in VARIANTS.items() if k in names or "ssim" + v.suffix in names}


def deltas_in(names) -> dict[str, tuple[str, str]]:
    """The DELTAS whose two variants are both among `names` (as `variants_in`)."""
    present = variants_in(names)
    return {d: pair for d, pair in DELTAS.items() if all(v in present for v in pair)}


def fid_sets(names) -> dict[str, str]:
    """{image set: PNG column} for FID: the ground truth and each variant among `names`."""
    return {REAL: "image_png", **{name: v.image for name, v in variants_in(names).items()}}


FID_SETS = fid_sets(["baseline", "blip", "finetuned"])  # the paper's three variants


def bucket_names(edges: list[float]) -> list[str]:
    """Mask-area buckets from their edges: [0.1, 0.3] -> `<10%`, `10-30%`, `>=30%`."""
    pct = [f"{round(100 * e)}%" for e in edges]
    if not pct:
        return [ALL]
    return [f"<{pct[0]}", *(f"{a[:-1]}-{b}" for a, b in zip(pct, pct[1:])), f">={pct[-1]}"]


def bucket_of(areas: np.ndarray, edges: list[float]) -> list[str]:
    names = bucket_names(edges)
    return [names[i] for i in np.searchsorted(np.asarray(edges), np.asarray(areas, dtype=np.float64), side="right")]


def spread(values: np.ndarray) -> dict:
    """Mean and standard deviation of the finite values (a perfect hole has infinite PSNR)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std(ddof=1)) if finite.size > 1 else None,
            "infinite": int((~np.isfinite(values)).sum())}


def intervals(columns: dict[str, np.ndarray], rows: np.ndarray, replicates: int, seed: int,
              confidence: float) -> dict:
    """Bootstrap intervals over the samples `rows` selects: each variant's mean of the PAIRED
    metrics, and each DELTAS pair's mean per-sample difference, all from the same draws."""
    series = {}
    variants, deltas = variants_in(columns), deltas_in(columns)
    for key, v in variants.items():
        series.update({(key, m): np.asarray(columns[m + v.suffix], dtype=np.float64)[rows] for m in PAIRED})
    for name, (a, b) in deltas.items():
        series.update({(name, m): series[(a, m)] - series[(b, m)] for m in PAIRED})
    out = mean_intervals(series, replicates, seed, confidence) if rows.any() else {}
    return {group: {m: out.get((group, m)) for m in PAIRED} for group in (*variants, *deltas)}


def fid_intervals(features: dict[str, torch.Tensor], replicates: int, seed: int, confidence: float) -> dict:
    """Each variant's FID and each DELTAS pair's FID difference, with normal bootstrap
    intervals (`bootstrap`: FID's draws are biased upwards): every draw resamples the samples
    (the rows of `features`, aligned across the image sets) and takes every FID of that
    draw, so a difference's interval is paired."""
    n = len(features[REAL])
    device = features[REAL].device

    def statistic(index):
        fids = fid_draw(features, REAL, None if index is None else torch.as_tensor(index, device=device))
        return {**fids, **{name: fids[a] - fids[b] for name, (a, b) in deltas_in(features).items()}}

    return statistic_intervals(statistic, n, replicates, seed, confidence, normal=True)


def fid_scopes(ids: list[str], features: dict[str, torch.Tensor], scopes: dict[str, list[str]], replicates: int,
               seed: int, confidence: float) -> dict[str, dict]:
    """`fid_intervals` on each scope's rows (e.g. "all", "changed": the samples whose caption
    fine-tuning changed); `ids` names the rows of `features`. A scope's rows are taken in the
    order of their ids, that of the per-sample metrics, so that a draw resamples the same
    samples for both. A scope of fewer than 2 samples has no FID: {}."""
    position = {i: k for k, i in enumerate(ids)}
    out = {}
    for scope, members in scopes.items():
        if len(members) < 2:
            out[scope] = {}
            continue
        rows = torch.as_tensor([position[i] for i in sorted(members)], device=features[REAL].device)
        out[scope] = fid_intervals({name: x[rows] for name, x in features.items()}, replicates, seed, confidence)
    return out


def correlation(predicted: np.ndarray, scored: np.ndarray) -> float | None:
    """Pearson's r of a prediction against what was scored, over the finite scores (an exactly
    restored hole has infinite PSNR); None under 3 samples or where either side is constant."""
    from torchmetrics.functional import pearson_corrcoef  # (a module every Ray worker imports: lazily)

    finite = np.isfinite(scored)
    p, s = (torch.as_tensor(np.asarray(x, dtype=np.float64)[finite]) for x in (predicted, scored))
    if len(s) < 3 or p.std() == 0 or s.std() == 0:
        return None
    return float(pearson_corrcoef(p, s))


def summarize(columns: dict[str, np.ndarray], fid: dict[str, dict], edges: list[float],
              bootstrap: tuple[int, int, float] = (1000, 0, 0.95), fid_bootstrap: dict | None = None) -> dict:
    """Per variant, overall, per mask bucket and on the samples whose caption fine-tuning
    changed: sample count, FID, every metric's spread, and bootstrap intervals (`intervals`;
    `bootstrap` is (replicates, seed, confidence)).

    `columns` holds the evaluated rows' metric columns, `mask_area`, `caption` and
    `caption_finetuned`; `fid` is `blipinpaint.fid.fid_table`'s output keyed by variant,
    `fid_bootstrap` `fid_scopes`' output for the scopes "all" and "changed".
    """
    buckets = np.array(bucket_of(columns["mask_area"], edges), dtype=object)
    changed = np.array([a != b for a, b in zip(columns["caption_finetuned"], columns["caption"])], dtype=bool)

    def block(rows: np.ndarray, group: str) -> dict:
        out = {}
        for name, v in variants_in(columns).items():
            entry = {"samples": int(rows.sum()), "fid": fid.get(name, {}).get(group)}
            entry.update({m: spread(np.asarray(columns[m + v.suffix])[rows]) for m in METRICS})
            out[name] = entry
        return out

    everything = np.ones(len(buckets), dtype=bool)
    replicates, seed, confidence = bootstrap
    fid_bootstrap = fid_bootstrap or {}
    overall = intervals(columns, everything, *bootstrap)
    on_changed = intervals(columns, changed, *bootstrap)
    for scope, ivs in ((overall, fid_bootstrap.get(ALL, {})), (on_changed, fid_bootstrap.get("changed", {}))):
        for group, iv in ivs.items():
            scope[group]["fid"] = iv
    changed_block = block(changed, "")
    for name, entry in changed_block.items():
        entry["fid"] = fid_bootstrap.get("changed", {}).get(name, {}).get("estimate")
    return {
        "variants": block(everything, ALL),
        "mask_buckets": {b: block(buckets == b, b) for b in bucket_names(edges) if (buckets == b).any()},
        # Only here can the fine-tuned variant differ from the BLIP one (an unchanged caption
        # reuses its inpainting).
        "changed": {"captions": int(changed.sum()), "of": len(changed),
                    "share": float(changed.mean()) if len(changed) else None,
                    "variants": changed_block},
        "intervals": {
            "replicates": replicates, "confidence": confidence, "seed": seed,
            ALL: overall,
            "mask_buckets": {b: intervals(columns, buckets == b, *bootstrap) for b in bucket_names(edges)
                             if (buckets == b).any()},
            "changed": on_changed,
        },
    }


def caption_effect(summary: dict, edges: list[float], metrics: tuple[str, ...] = ("ssim", "psnr")) -> dict:
    """Where the caption helps, per mask-area bucket: for each of `metrics` (those that measure
    the inpainting against the ground truth), "helps" where the BLIP − baseline interval lies
    above 0, "hurts" where it lies below, "unclear" where it holds 0 (or was not taken). And
    the bucket from which the caption helps no more (on none of `metrics`, in that bucket and
    every larger one), and its lower edge: the `inpaint.caption_max_mask_area` this run
    suggests. None: it helps up to the largest bucket (or in none)."""
    def verdict(iv: dict | None) -> str:
        if iv is None or iv.get("low") is None:
            return "unclear"
        return "helps" if iv["low"] > 0 else "hurts" if iv["high"] < 0 else "unclear"

    buckets = summary["intervals"]["mask_buckets"]
    verdicts = {b: {m: verdict(g["blip_vs_baseline"].get(m)) for m in metrics} for b, g in buckets.items()}
    stops = None
    for b in reversed(list(verdicts)):  # the largest buckets first
        if "helps" in verdicts[b].values():
            break
        stops = b
    if stops == next(iter(verdicts), None) and not any("helps" in v.values() for v in verdicts.values()):
        stops = None  # nowhere: no edge to name
    edge = edges[bucket_names(edges).index(stops) - 1] if stops else None
    return {"metrics": list(metrics), "buckets": verdicts, "stops_helping_from": stops,
            "caption_max_mask_area": edge}
