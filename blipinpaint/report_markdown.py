"""`report.md`: the evaluation in words and tables, and the PNG figures it shows.

`plot_figures` draws the figures beside the report (with `plots`); `write_report` writes the
Markdown from the evaluate job's report (`report.json`'s content). The words also appear on
`report.html` (`report_page`), so they are built here once.
"""

from __future__ import annotations

import numpy as np

from blipinpaint import builders
from blipinpaint.config import Config
from blipinpaint.evaluation import ALL, DELTA_LABELS, VARIANTS, deltas_in, variants_in
from blipinpaint.io import decode_png
from blipinpaint.layout import Folder
from blipinpaint.masks import masked_pixels
from blipinpaint.models import fid_inception
from blipinpaint.plots import plot_grouped_bars, plot_image_grid
from blipinpaint.reader import read_sorted
from blipinpaint.report_tables import Table, bucket_table, fmt, fmt_interval, metrics_table, paired_table, table1
from blipinpaint.scorer import TARGETS
from blipinpaint.seeds import sample_seed
from blipinpaint.storage import write_text

METRIC_LABELS = {"ssim": "SSIM ↑", "psnr": "PSNR (dB) ↑", "clip_score": "CLIP score ↑"}


def fid_protocol(cfg: Config, network: dict | None = None) -> str:
    """How the FID features were taken, for the report: numbers compare only under one protocol.
    Told from the network the FID workers load (`network`, default `builders.fid_network`),
    never from the config's name for it."""
    network = network or builders.fid_network(cfg)
    weights = f"model.safetensors sha256 {network['weights_sha256'][:16]}…"
    if network["standard"]:
        return ("standard FID: Inception v3 pool3 (2048-d) with the TensorFlow FID weights (" + network["evidence"]
                + f"; {weights}), images resized to 299x299 with TensorFlow 1.x's bilinear resize and no "
                "antialiasing (as torch-fidelity and the original FID), from the decoded uint8 PNG pixels")
    if network["network"] == fid_inception.FEATURE_EXTRACTOR:
        return ("Inception v3 pool3 (2048-d) with the standard FID resize and input scaling, but not the standard "
                f"Inception weights: {network['evidence']} ({weights}); these FID values do not compare with "
                "published ones")
    return (f"features of `{builders.model_ids(cfg)['fid']}` ({network['num_features']}-d, {weights}; not the "
            "standard Inception): these FID values do not compare with published ones")


def precision_text(report: dict) -> str:
    """At what precision both BLIP captions were decoded, and how much of the fine-tune survived it."""
    survival = report["decoder_precision"]
    share = survival["survived_share"]
    share = "none changed" if share is None else f"{fmt(100 * share, 1)} %"
    return (f"Both captions' text decoders ran in {survival['dtype']} (`caption.decoder_dtype`): "
            f"{survival['survived']} of the {survival['changed']} decoder weights fine-tuning changed survive that "
            f"cast ({share}; a weight whose change rounds away is the original BLIP's again).")


def scorer_text(changed: dict) -> str:
    """The scorer's predictions for the changed captions against their scores, in words."""
    scorer = changed.get("scorer", {})
    if not scorer.get("samples"):
        return "No caption changed: nothing to compare the scorer's predictions with."
    if "mean_predicted" not in scorer:  # e.g. reward_ranked fine-tuning, run without a scorer
        return f"{scorer['samples']} captions changed; this run has no trained scorer to compare predictions with."
    pearson = ", ".join(f"{t} {fmt(v)}" for t, v in scorer["pearson_r"].items())
    means = ", ".join(f"{t} {fmt(scorer['mean_predicted'][t], 3)} predicted, {fmt(scorer['mean_scored'][t], 3)} "
                      f"scored" for t in TARGETS)
    return (f"For the {scorer['samples']} changed captions, the frozen scorer's prediction (from the fine-tuned "
            f"decoder's features) against what their inpaintings scored: Pearson r {pearson} (n/a under 3 samples); "
            f"means {means}.")


def reranked_text(summary: dict) -> str:
    """The scorer-reranked variant in words (with `caption.candidates` above 1), or ""."""
    reranked = summary.get("reranked")
    if not reranked:
        return ""
    candidates = reranked["candidates"]
    return (f"A fourth time with the scorer-reranked caption: the original BLIP proposed {candidates} captions "
            f"per sample (its greedy one and {candidates - 1} sampled), and the frozen scorer picked the one it "
            f"predicts the lowest L_BLIP for; it differs from the greedy caption on {reranked['differs']} of "
            f"{reranked['of']} samples ({fmt(100 * (reranked['share'] or 0), 1)} %), and elsewhere reuses the BLIP "
            "variant's inpainting.\n")


def caption_effect_text(summary: dict) -> str:
    """`evaluation.caption_effect` in words, with its table: how to set `inpaint.caption_max_mask_area`."""
    words, table = caption_effect_parts(summary)
    return f"{words}\n\n{table}"


def caption_effect_parts(summary: dict) -> tuple[str, Table]:
    """`caption_effect_text`'s words and table apart (report.html shows them too)."""
    effect, bucket_intervals = summary["caption_effect"], summary["intervals"]["mask_buckets"]
    rows = [[b, str(summary["mask_buckets"][b]["blip"]["samples"]),
             *(f"{verdicts[m]}: {fmt_interval(bucket_intervals[b]['blip_vs_baseline'].get(m), 3, sign=True)}"
               for m in effect["metrics"])] for b, verdicts in effect["buckets"].items()]
    table = Table(["mask area", "n", *(f"BLIP − baseline, {m}" for m in effect["metrics"])], rows)
    helping = [b for b, v in effect["buckets"].items() if "helps" in v.values()]
    if effect["stops_helping_from"] is not None:
        advice = (f"The caption helps no more from mask area {effect['stops_helping_from']} on: "
                  f"`inpaint.caption_max_mask_area={effect['caption_max_mask_area']}` inpaints those samples "
                  "without text.")
    elif helping:
        advice = "The caption helps up to the largest masks here: leave `inpaint.caption_max_mask_area` unset."
    else:
        advice = ("No bucket shows the caption helping (every interval holds 0, or none could be taken): "
                  "more samples are needed to choose `inpaint.caption_max_mask_area`.")
    return (f"The paired BLIP − baseline difference on {', '.join(effect['metrics'])} per bucket (\"helps\": its "
            f"interval lies above 0). {advice} The plot is `deltas.png`.", table)


def intervals_text(intervals: dict) -> str:
    """How the intervals were taken, in words."""
    return f"""Intervals: {round(100 * intervals['confidence'])} % percentile bootstrap over samples
({intervals['replicates']} draws of the samples with replacement, seed {intervals['seed']}), every statistic
resampled with the same draws. A difference (`BLIP − baseline`, `fine-tuned − BLIP`) is
paired: the mean over samples of each sample's two scores, so the two inpaintings of a
sample stay together in every draw. A sample whose PSNR is infinite (a hole restored
exactly) is left out of that column. Means get the percentile interval. FID gets the normal
interval, FID ± z times the spread of {intervals['fid_replicates']} draws' FIDs: FID is biased upwards on
fewer distinct images, so the draws (with repeats) sit above the estimate and their
percentiles would miss it; FID differences are paired the same way. FID and its interval
are taken on all samples and on the changed ones (from 2 up; a small subset's FID is far
above the whole set's, so compare the variants within a subset, not across)."""


def grid_rows(rows: dict[str, np.ndarray]) -> list[dict]:
    """Decoded images and captions of the example rows: ground truth, masked, each variant
    whose images `rows` holds (`grid_titles`)."""
    variants = [v for v in VARIANTS.values() if v.image in rows]
    out = []
    for i in range(len(rows["id"])):
        image, mask = decode_png(rows["image_png"][i]), decode_png(rows["mask_png"][i]) > 127
        out.append({
            "id": str(rows["id"][i]),
            "images": [image, masked_pixels(image[None], mask[None])[0],
                       *(decode_png(rows[v.image][i]) for v in variants)],
            "captions": ["", "", *("" if v.caption is None else str(rows[v.caption][i]) for v in variants)],
        })
    return out


def grid_titles(names) -> list[str]:
    return ["ground truth", "masked", *(v.short for v in variants_in(names).values())]


def plot_figures(cfg: Config, report: dict, ids: list[str], out_dir: str) -> None:
    """The report's figures into `out_dir`: metrics.png (mean ± std per variant),
    mask_buckets.png, deltas.png (the paired differences with their intervals) and grid.png
    (`evaluate.grid_rows` of the evaluated samples `ids`, chosen by a hash)."""
    out_dir = Folder(out_dir)
    name, blocks, buckets = report["dataset"], report["variants"], report["mask_buckets"]
    variants, deltas = variants_in(blocks), deltas_in(blocks)

    def bars(block: dict, metric: str) -> dict:
        return {x.short: (block[k][metric]["mean"], block[k][metric]["std"]) for k, x in variants.items()}

    panels = {label: {"": bars(blocks, m)} for m, label in METRIC_LABELS.items()}
    plot_grouped_bars(panels, f"{name}: mean ± std over {blocks['blip']['samples']} held-out samples",
                      out_dir / "metrics.png")
    panels = {"CLIP score ↑": {b: bars(blk, "clip_score") for b, blk in buckets.items()},
              "FID ↓": {b: {x.short: (blk[k]["fid"], None) for k, x in variants.items()} for b, blk in buckets.items()},
              "PSNR (dB) ↑": {b: bars(blk, "psnr") for b, blk in buckets.items()}}
    plot_grouped_bars(panels, f"{name}: by mask area (share of the image hidden)", out_dir / "mask_buckets.png")
    intervals = report["intervals"]
    scopes = {"all": intervals[ALL], **intervals["mask_buckets"]}

    def delta(group: dict | None) -> tuple:
        return (None, None) if group is None or group["estimate"] is None else (
            group["estimate"], None if group["low"] is None else (group["low"], group["high"]))

    panels = {f"{label.split(' ')[0]} difference": {s: {DELTA_LABELS[k]: delta(g[k][m]) for k in deltas}
                                                    for s, g in scopes.items()}
              for m, label in METRIC_LABELS.items()}
    plot_grouped_bars(panels, f"{name}: paired differences per sample, {round(100 * intervals['confidence'])} % "
                      "bootstrap intervals, by mask area", out_dir / "deltas.png")
    examples = sorted(ids, key=lambda i: sample_seed(cfg.seed, i, "grid"))[: cfg.evaluate.grid_rows]
    captions = [x.caption for x in variants.values() if x.caption]
    images = [x.image for x in variants.values()]
    rows = read_sorted(out_dir, examples, ["image_png", "mask_png", *captions, *images])
    plot_image_grid(grid_rows(rows), grid_titles(variants), out_dir / "grid.png")


def write_report(cfg: Config, report: dict, others: dict[str, dict], out_dir: str) -> dict[str, Table]:
    """`report.md`, beside the figures of `plot_figures`: the evaluation `report` in words and
    tables; Table 1 also has a column group per dataset of `others` (other runs' reports by
    dataset, `evaluate.other_runs`). Returns its tables, which `report.html` shows too."""
    blocks, changed = report["variants"], report["changed"]
    fid_name = report["models"].get("fid", "")
    tables = {"table1": table1({report["dataset"]: report, **others}), "paired": paired_table(report),
              "metrics": metrics_table(report), "buckets": bucket_table(report)}
    scorer_plot = ("\n\n![scorer on the changed captions](scorer_changed.png)"
                   if changed["scorer"].get("samples") else "")
    markdown = f"""# Evaluation: {report['dataset']}

{blocks['blip']['samples']} held-out samples of `{cfg.run_dir}` (never seen by the scorer or the
fine-tuning), models preset `{cfg.models.preset}`{f', FID features `{fid_name}`' if fid_name else ''}.
Each sample is inpainted three times from the same noise: without text (the paper's
baseline), with the original BLIP's caption, and with the fine-tuned BLIP's caption.
{reranked_text(report)}CLIP score is taken against the caption that guided the image (the baseline against
BLIP's); FID against the ground-truth images. FID protocol: {report['fid_protocol']}.

Fine-tuning changed the caption of {changed['captions']} of {changed['of']} samples
({fmt(100 * (changed['share'] or 0), 1)} %). Where it did not, the fine-tuned variant reuses the
BLIP variant's inpainting and metrics: the fine-tuned and BLIP rows can differ only on the
changed samples. {precision_text(report)}

{intervals_text(report['intervals'])}

{scorer_text(changed)}{scorer_plot}

## Table 1

{tables["table1"]}

## Paired differences per sample

{tables["paired"]}

![paired differences](deltas.png)

## SSIM, PSNR and CLIP score (paper, Figures 2-3)

{tables["metrics"]}

![metrics](metrics.png)

## By mask area

{tables["buckets"]}

![mask buckets](mask_buckets.png)

## Where the caption helps, by mask area

{caption_effect_text(report)}

## Examples (paper, Figure 4)

![examples](grid.png)
"""
    write_text(Folder(out_dir) / "report.md", markdown)
    return tables
