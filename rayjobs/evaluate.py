"""Evaluate: FID and CLIP score of baseline, BLIP-guided and fine-tuned-BLIP-guided inpainting.

    python -m rayjobs.evaluate [--config CONFIG.yaml] [dotted.key=value ...]

On a cluster (the tunnel, the token, logs and stop: docs/cluster.md):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.evaluate --config configs/paper-coco.yaml

On the held-out split of generate's rows (never seen by the scorer or the fine-tuning),
capped at `evaluate.limit`, generate's two variants are joined by the fine-tuned BLIP's
(and, with `caption.candidates` above 1, the scorer-reranked caption's), inpainted from
the same noise and committed exactly once to `run_dir/eval/samples/`. FID workers fold
Inception features into mergeable statistics; the report (`report.html` first, with
`report.md`, `report.json` and the plots) holds Table 1 with bootstrap intervals.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time

import numpy as np
import ray
import torch

from blipinpaint import builders, fingerprint, report_page
from blipinpaint.batches import Guarded
from blipinpaint.config import Config, dataset_name, heldout_fraction, to_yaml
from blipinpaint.errors import ConfigError, JobError
from blipinpaint.evaluation import (
    ALL,
    DELTA_LABELS,
    PAIRED,
    VARIANTS,
    Variant,
    bucket_names,
    bucket_of,
    caption_effect,
    correlation,
    deltas_in,
    fid_sets,
    grid_rows,
    grid_titles,
    summarize,
    variants_in,
)
from blipinpaint.layout import RunLayout
from blipinpaint.models.presets import is_standard_inception
from blipinpaint.plots import plot_grouped_bars, plot_image_grid, plot_scatter
from blipinpaint.reader import committed_sample_ids, read_errors, read_rows, read_sorted, row_reads
from blipinpaint.records import EVAL_SCHEMA, METRICS, RERANKED_SCHEMA, decode_images
from blipinpaint.report_tables import Table, bucket_table, fmt, fmt_interval, metrics_table, paired_table, table1
from blipinpaint.scorer import TARGETS, ScoreNet
from blipinpaint.seeds import heldout, sample_seed
from blipinpaint.storage import digest, exists, is_dir, is_file, local_dir, read_text, write_text
from blipinpaint.variant_stages import ADDED, build_added_captioners, build_added_inpainters, build_added_metrics
from blipinpaint.writer import CommitLog
from rayjobs.cli import job_main
from rayjobs.cluster import connect
from rayjobs.fid_pass import compute_fid
from rayjobs.stream import ErrorWriter, commit_stage, model_stages, run_stream

log = logging.getLogger("blipinpaint.evaluate")

# What the generate step's held-out rows bring along.
INPUT_COLUMNS = ["id", "source", "caption", "mask_area", "noise_seed",
                 *(m + s for s in ("", "_baseline") for m in METRICS),
                 "image_png", "mask_png", "inpainted_png", "inpainted_baseline_png"]
# The page's plots, beside it: {file: title}.
PLOTS = {"metrics.png": "SSIM, PSNR and CLIP score per variant", "mask_buckets.png": "by mask area",
         "deltas.png": "paired differences per sample, by mask area", "grid.png": "examples (paper, Figure 4)",
         "scorer_changed.png": "the scorer's prediction for the changed captions against their scores"}
ERRORS_LISTED = 1000  # error rows on the page at most (the count says how many there are)
METRIC_LABELS = {"ssim": "SSIM ↑", "psnr": "PSNR (dB) ↑", "clip_score": "CLIP score ↑"}


def evaluated_variants(cfg: Config) -> dict[str, Variant]:
    """The variants this configuration evaluates: the paper's three, and the scorer-reranked
    caption's with `caption.candidates` above 1."""
    return variants_in(["baseline", "blip", "finetuned", *(["reranked"] if cfg.caption.candidates > 1 else [])])


def gallery_columns(variants: dict[str, Variant]) -> list[str]:
    """What a gallery card shows of an evaluated row."""
    return ["source", "mask_area", "image_png", "mask_png", *(v.caption for v in variants.values() if v.caption),
            *(v.image for v in variants.values()), *(m + v.suffix for v in variants.values() for m in PAIRED)]


def evaluation_ids(cfg: Config, generated: list[str] | None = None) -> list[str]:
    """The held-out ids of the `generated` ones (default: generate's committed samples; the
    split every job uses), at most `evaluate.limit` of them by a hash."""
    if generated is None:
        generated = committed_sample_ids(RunLayout(cfg.run_dir).generate)
    fraction = heldout_fraction(cfg, generated)
    chosen = [i for i in generated if heldout(cfg.seed, i, fraction)]
    if cfg.evaluate.limit is not None:
        chosen = sorted(chosen, key=lambda i: sample_seed(cfg.seed, i, "evaluate"))[: cfg.evaluate.limit]
    return sorted(chosen)


def prepare(batch: dict, errors: ErrorWriter, retries: int) -> dict:
    """CPU task: read the held-out rows; the ground truth and mask as arrays again.

    A row whose PNGs cannot be decoded becomes an error row; a part that cannot be read
    (storage, not data) fails the task, which Ray retries.
    """
    rows = read_rows(batch, INPUT_COLUMNS)
    rows["error"] = np.full(len(rows["id"]), "", dtype=object)
    return Guarded("prepare", decode_images, errors, retries)(rows)


def eval_schema(cfg: Config):
    return RERANKED_SCHEMA if "reranked" in evaluated_variants(cfg) else EVAL_SCHEMA


def build_dataset(cfg: Config, pending: list[str], ledger, owner: str | None = None) -> ray.data.Dataset:
    stream, run_layout = cfg.generate, RunLayout(cfg.run_dir)
    errors = ErrorWriter(run_layout.eval, owner)
    added = [v for k, v in evaluated_variants(cfg).items() if k in ADDED]
    pools = {
        "captioner": functools.partial(build_added_captioners, cfg),
        "inpainter": functools.partial(build_added_inpainters, cfg, added),
        "metrics": functools.partial(build_added_metrics, cfg, added),
    }
    reads = row_reads(run_layout.generate, pending)
    ds = ray.data.from_items(reads, override_num_blocks=len(reads))
    ds = ds.map_batches(prepare, fn_kwargs={"errors": errors, "retries": stream.batch_retries},
                        batch_size=1, num_cpus=stream.read.num_cpus)
    ds = model_stages(ds, pools, stream, errors, ledger)
    return commit_stage(ds, run_layout.eval, eval_schema(cfg), {}, stream.rows_per_file, stream.read.num_cpus,
                        owner)


def scorer_on_changed(cfg: Config, out_dir: str, ids: list[str]) -> dict:
    """For the captions fine-tuning changed (`ids`): what the frozen scorer predicts for them
    (from the fine-tuned decoder's caption features) against what their inpaintings then
    scored. Fine-tuning follows the scorer's predictions; this says whether they held."""
    model_dir = RunLayout(cfg.run_dir).scorer_model
    if len(ids) < 1 or not is_dir(model_dir):
        return {"samples": len(ids), "pearson_r": {t: None for t in TARGETS}}
    features = f"{VARIANTS['finetuned'].caption}_features"
    rows = read_sorted(out_dir, ids, [features, *(t + "_finetuned" for t in TARGETS)])
    scorer = ScoreNet.from_pretrained(local_dir(model_dir))
    with torch.no_grad():
        predicted = scorer.destandardize(scorer(torch.as_tensor(np.stack(rows[features]), dtype=torch.float32)))
        predicted = predicted.numpy().astype(np.float64)
    true = np.stack([np.asarray(rows[t + "_finetuned"], dtype=np.float64) for t in TARGETS], axis=1)
    plot_scatter(predicted, true, TARGETS, f"{out_dir}/scorer_changed.png",
                 title=f"scorer's prediction for the {len(ids)} changed captions against their scores")
    return {"samples": len(ids),
            "pearson_r": {t: correlation(predicted[:, j], true[:, j]) for j, t in enumerate(TARGETS)},
            "mean_predicted": dict(zip(TARGETS, predicted.mean(axis=0).tolist())),
            "mean_scored": {t: float(np.mean(true[np.isfinite(true[:, j]), j])) for j, t in enumerate(TARGETS)}}


def fid_protocol(cfg: Config) -> str:
    """How the FID features were taken, for the report: numbers compare only under one protocol."""
    fid = builders.stored_refs(cfg).get("fid")
    if fid is not None and is_standard_inception(fid):
        return ("standard FID: Inception v3 pool3 (2048-d) with the TensorFlow FID weights, images resized to "
                "299x299 with TensorFlow 1.x's bilinear resize and no antialiasing (as torch-fidelity and "
                "the original FID; torchmetrics' default antialiasing is off), from the decoded uint8 PNG pixels")
    return (f"features of `{builders.model_ids(cfg)['fid']}` (not the standard Inception): "
            "these FID values do not compare with published ones")


def scorer_text(changed: dict) -> str:
    """The scorer's predictions for the changed captions against their scores, in words."""
    scorer = changed.get("scorer", {})
    if not scorer.get("samples"):
        return "No caption changed: nothing to compare the scorer's predictions with."
    r = ", ".join(f"{t} {fmt(v)}" for t, v in scorer["pearson_r"].items())
    means = ", ".join(f"{t} {fmt(scorer['mean_predicted'][t], 3)} predicted, {fmt(scorer['mean_scored'][t], 3)} "
                      f"scored" for t in TARGETS)
    return (f"For the {scorer['samples']} changed captions, the frozen scorer's prediction (from the fine-tuned "
            f"decoder's features) against what their inpaintings scored: Pearson r {r} (n/a under 3 samples); "
            f"means {means}.")


def reranked_text(summary: dict) -> str:
    """The scorer-reranked variant in words (with `caption.candidates` above 1), or ""."""
    r = summary.get("reranked")
    if not r:
        return ""
    return (f"A fourth time with the scorer-reranked caption: the original BLIP proposed {r['candidates']} captions "
            f"per sample (its greedy one and {r['candidates'] - 1} sampled), and the frozen scorer picked the one it "
            f"predicts the lowest L_BLIP for; it differs from the greedy caption on {r['differs']} of {r['of']} "
            f"samples ({fmt(100 * (r['share'] or 0), 1)} %), and elsewhere reuses the BLIP variant's inpainting.\n")


def caption_effect_text(summary: dict) -> str:
    """`evaluation.caption_effect` in words, with its table: how to set `inpaint.caption_max_mask_area`."""
    words, table = caption_effect_parts(summary)
    return f"{words}\n\n{table}"


def caption_effect_parts(summary: dict) -> tuple[str, Table]:
    """`caption_effect_text`'s words and table apart (report.html shows them too)."""
    effect, iv = summary["caption_effect"], summary["intervals"]["mask_buckets"]
    rows = [[b, str(summary["mask_buckets"][b]["blip"]["samples"]),
             *(f"{verdicts[m]}: {fmt_interval(iv[b]['blip_vs_baseline'].get(m), 3, sign=True)}"
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


def intervals_text(iv: dict) -> str:
    """How the intervals were taken, in words."""
    return f"""Intervals: {round(100 * iv['confidence'])} % percentile bootstrap over samples
({iv['replicates']} draws of the samples with replacement, seed {iv['seed']}), every statistic
resampled with the same draws. A difference (`BLIP − baseline`, `fine-tuned − BLIP`) is
paired: the mean over samples of each sample's two scores, so the two inpaintings of a
sample stay together in every draw. A sample whose PSNR is infinite (a hole restored
exactly) is left out of that column. Means get the percentile interval. FID gets the normal
interval, FID ± z times the spread of {iv['fid_replicates']} draws' FIDs: FID is biased upwards on
fewer distinct images, so the draws (with repeats) sit above the estimate and their
percentiles would miss it; FID differences are paired the same way. FID and its interval
are taken on all samples and on the changed ones (from 2 up; a small subset's FID is far
above the whole set's, so compare the variants within a subset, not across)."""


def write_report(cfg: Config, summary: dict, ids: list[str], out_dir: str) -> dict[str, Table]:
    """`report.md` with its tables and figures (also those of `evaluate.other_runs`); returns
    its tables, which `report.html` shows too."""
    name = dataset_name(cfg)
    datasets = {name: summary}
    for other in cfg.evaluate.other_runs:
        path = RunLayout(other).eval.report
        if not is_file(path):  # e.g. that run is still going: this report is still useful
            log.warning("evaluate.other_runs: %s does not exist yet; left out of Table 1", path)
            continue
        report = json.loads(read_text(path))
        datasets[report["dataset"]] = report
    v, buckets = summary["variants"], summary["mask_buckets"]
    variants, deltas = variants_in(v), deltas_in(v)

    def bars(block: dict, metric: str) -> dict:
        return {x.short: (block[k][metric]["mean"], block[k][metric]["std"]) for k, x in variants.items()}

    panels = {label: {"": bars(v, m)} for m, label in METRIC_LABELS.items()}
    plot_grouped_bars(panels, f"{name}: mean ± std over {v['blip']['samples']} held-out samples",
                      f"{out_dir}/metrics.png")
    panels = {"CLIP score ↑": {b: bars(blk, "clip_score") for b, blk in buckets.items()},
              "FID ↓": {b: {x.short: (blk[k]["fid"], None) for k, x in variants.items()} for b, blk in buckets.items()},
              "PSNR (dB) ↑": {b: bars(blk, "psnr") for b, blk in buckets.items()}}
    plot_grouped_bars(panels, f"{name}: by mask area (share of the image hidden)", f"{out_dir}/mask_buckets.png")
    iv = summary["intervals"]
    scopes = {"all": iv[ALL], **iv["mask_buckets"]}

    def delta(group: dict | None) -> tuple:
        return (None, None) if group is None or group["estimate"] is None else (
            group["estimate"], None if group["low"] is None else (group["low"], group["high"]))

    panels = {f"{label.split(' ')[0]} difference": {s: {DELTA_LABELS[k]: delta(g[k][m]) for k in deltas}
                                                    for s, g in scopes.items()}
              for m, label in METRIC_LABELS.items()}
    plot_grouped_bars(panels, f"{name}: paired differences per sample, {round(100 * iv['confidence'])} % bootstrap "
                      "intervals, by mask area", f"{out_dir}/deltas.png")
    examples = sorted(ids, key=lambda i: sample_seed(cfg.seed, i, "grid"))[: cfg.evaluate.grid_rows]
    captions = [x.caption for x in variants.values() if x.caption]
    images = [x.image for x in variants.values()]
    rows = read_sorted(out_dir, examples, ["image_png", "mask_png", *captions, *images])
    plot_image_grid(grid_rows(rows), grid_titles(variants), f"{out_dir}/grid.png")
    fid_name = builders.model_ids(cfg).get("fid", "")
    changed = summary["changed"]
    tables = {"table1": table1(datasets), "paired": paired_table(summary), "metrics": metrics_table(summary),
              "buckets": bucket_table(summary)}
    scorer_plot = ("\n\n![scorer on the changed captions](scorer_changed.png)"
                   if changed["scorer"].get("samples") else "")
    markdown = f"""# Evaluation: {name}

{v['blip']['samples']} held-out samples of `{cfg.run_dir}` (never seen by the scorer or the
fine-tuning), models preset `{cfg.models.preset}`{f', FID features `{fid_name}`' if fid_name else ''}.
Each sample is inpainted three times from the same noise: without text (the paper's
baseline), with the original BLIP's caption, and with the fine-tuned BLIP's caption.
{reranked_text(summary)}CLIP score is taken against the caption that guided the image (the baseline against
BLIP's); FID against the ground-truth images. FID protocol: {fid_protocol(cfg)}.

Fine-tuning changed the caption of {changed['captions']} of {changed['of']} samples
({fmt(100 * (changed['share'] or 0), 1)} %). Where it did not, the fine-tuned variant reuses the
BLIP variant's inpainting and metrics: the fine-tuned and BLIP rows can differ only on the
changed samples.

{intervals_text(iv)}

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

{caption_effect_text(summary)}

## Examples (paper, Figure 4)

![examples](grid.png)
"""
    write_text(f"{out_dir}/report.md", markdown)
    return tables


def write_page(cfg: Config, report: dict, tables: dict[str, Table], out_dir: str, ids: list[str],
               selected: list[str]) -> str:
    """`report.html` (`blipinpaint.report_page`): the tables, the plots, a gallery of up to
    `evaluate.gallery_limit` of the evaluated samples `ids` (chosen by a hash, as
    `evaluate.limit`), the errors of generate and those of evaluate among the `selected`
    held-out ids. Reads a part at a time, so that only that part's chosen rows are in memory."""
    edges = list(cfg.evaluate.mask_buckets)
    chosen = sorted(ids, key=lambda i: sample_seed(cfg.seed, i, "gallery"))[: cfg.evaluate.gallery_limit]
    cards, written = [], set()
    columns = gallery_columns(variants_in(report["variants"]))
    for part in row_reads(out_dir, chosen):
        rows = read_rows({"path": [part["path"]], "ids": [part["ids"]]}, ["id", *columns])
        files = {}
        for k, bucket in enumerate(bucket_of(rows["mask_area"], edges)):
            card, images = report_page.card({c: v[k] for c, v in rows.items()}, len(cards), bucket)
            cards.append(card)
            files.update(images)
        report_page.write_files(out_dir, files)
        written.update(files)
    generate_errors, generate_count = read_errors(RunLayout(cfg.run_dir).generate, limit=ERRORS_LISTED)
    evaluate_errors, _ = read_errors(out_dir, set(selected), limit=ERRORS_LISTED)
    errors = [{"job": "evaluate", **e} for e in evaluate_errors] + [{"job": "generate", **e} for e in generate_errors]
    s, iv = report["evaluation_set"], report["intervals"]
    settings = [("dataset", report["dataset"]), ("run_dir", cfg.run_dir), ("models preset", cfg.models.preset),
                *((f"model: {k}", v) for k, v in report["models"].items()), ("FID protocol", report["fid_protocol"]),
                ("held-out share", fmt(s["heldout_fraction"], 3)), ("evaluate.limit", str(s["limit"])),
                ("mask-area bucket edges", ", ".join(map(str, edges))),
                ("bootstrap", f"{iv['replicates']} draws ({iv['fid_replicates']} for FID), "
                              f"{round(100 * iv['confidence'])} % intervals, seed {iv['seed']}"),
                ("seed", str(cfg.seed)), ("evaluate's wall time", f"{report['wall_s']} s")]
    page = report_page.write_page(out_dir, {
        "dataset": report["dataset"], "run_dir": cfg.run_dir,
        "counts": {"samples": s["samples"], "errors": s["errors"], "generate_errors": generate_count,
                   "changed": report["changed"]["captions"]},
        "tables": {**tables, "caption_effect": caption_effect_parts(report)[1]},
        "caption_effect_text": caption_effect_parts(report)[0].replace("`", ""),
        "intervals_text": intervals_text(iv).replace("`", ""),
        "scorer_text": scorer_text(report["changed"]),
        "reranked_text": reranked_text(report).strip(),
        "plots": [{"file": f, "title": t} for f, t in PLOTS.items() if is_file(f"{out_dir}/{f}")
                  and (f != "scorer_changed.png" or report["changed"]["scorer"].get("samples"))],
        "gallery": {"cards": sorted(cards, key=lambda c: c["id"]), "shown": len(cards), "total": len(ids),
                    "limit": cfg.evaluate.gallery_limit, "sort_keys": report_page.sort_keys(report["variants"]),
                    "buckets": [b for b in bucket_names(edges) if b in report["mask_buckets"]]},
        "errors": {"rows": errors[:ERRORS_LISTED], "total": s["errors"] + generate_count},
        "settings": settings, "config_yaml": to_yaml(cfg)})
    report_page.prune_files(out_dir, written)
    return page


def run(cfg: Config) -> dict:
    started = time.perf_counter()
    run_layout = RunLayout(cfg.run_dir)
    out_dir, variants = run_layout.eval, evaluated_variants(cfg)
    # 1. Check the inputs: generate's rows, the fine-tuned BLIP, the scorer that reranks.
    for path, step in ((run_layout.generate.samples, "rayjobs.generate"),
                       (run_layout.blip / "model.safetensors", "rayjobs.finetune_blip")):
        if not exists(path):
            raise ConfigError(f"{path} is missing: run {step} first")
    if "reranked" in variants and not is_dir(run_layout.scorer_model):
        raise ConfigError(f"caption.candidates={cfg.caption.candidates} reranks captions with the trained scorer, "
                          f"and {run_layout.scorer_model} is missing: run rayjobs.train_scorer first")
    generated = committed_sample_ids(run_layout.generate)
    ids = evaluation_ids(cfg, generated)
    if len(ids) < 2:
        raise ConfigError(f"only {len(ids)} held-out samples in {run_layout.generate.samples}: FID needs at least 2 "
                          f"(more inputs, or a larger train.val_fraction)")
    # Rows made with another fine-tuned BLIP, another reranking scorer or other generate
    # settings must not mix.
    check = run_layout.finetune_check
    decoder = json.loads(read_text(check)).get("decoder") if is_file(check) else None
    scorer = digest(run_layout.scorer_model / "model.safetensors") if "reranked" in variants else None
    fingerprint.check(out_dir, fingerprint.evaluate(cfg, decoder, scorer))
    write_text(out_dir.config, to_yaml(cfg))
    builders.fill_store(cfg)  # the inpainter, CLIP and FID networks from the model store, never the hub
    # 2. Resume: the held-out samples not yet evaluated.
    commit_log = CommitLog(out_dir, eval_schema(cfg))
    resumed = commit_log.resume(cfg.evaluate.retry_failed)
    pending = [i for i in ids if i not in resumed.done]
    log.info("%d held-out samples to evaluate: %d already done, %d to do", len(ids), len(ids) - len(pending),
             len(pending))
    # 3. Stream them through the added variants' captioner, inpainter and metrics.
    if pending:
        run_stream(cfg, "evaluate", out_dir, len(ids), len(ids) - len(pending), len(pending),
                   lambda cfg, ledger: build_dataset(cfg, pending, ledger, resumed.owner))
    commit_log.release()
    # 4. Account for every held-out sample.
    account = commit_log.account(ids)
    account.check(out_dir, "samples")
    sample_ids = sorted(account.ok)
    if len(sample_ids) < 2:
        raise JobError(f"{out_dir}: only {len(sample_ids)} samples evaluated, FID needs 2 (errors: "
                       f"{dict(account.errors_by_reason)}, listed in {out_dir.errors}; evaluate.retry_failed=true "
                       "tries `stage failed` rows again)")
    columns = read_sorted(out_dir, sample_ids, ["mask_area", *(v.caption for v in variants.values() if v.caption),
                                                *(m + v.suffix for v in variants.values() for m in METRICS)])
    finetuned = VARIANTS["finetuned"].caption
    changed = [str(i) for i, a, c in zip(columns["id"], columns["caption"], columns[finetuned]) if a != c]
    # 5. FID of every variant, overall and per mask bucket, with bootstrap intervals.
    connect(cfg.ray_address, cfg.ray_progress)
    fid, fid_bootstrap = compute_fid(cfg, out_dir, fid_sets(variants), sample_ids, changed)
    # 6. Summarize: means, paired differences and their intervals, where the caption helps.
    bootstrap = cfg.evaluate.bootstrap
    summary = summarize(columns, fid, list(cfg.evaluate.mask_buckets),
                        (bootstrap.replicates, cfg.seed, bootstrap.confidence), fid_bootstrap)
    summary["intervals"]["fid_replicates"] = bootstrap.fid_replicates
    summary["caption_effect"] = caption_effect(summary, list(cfg.evaluate.mask_buckets))
    summary["changed"]["scorer"] = scorer_on_changed(cfg, out_dir, changed)
    if "reranked" in variants:
        differs = [a != b for a, b in zip(columns["caption_reranked"], columns["caption"])]
        summary["reranked"] = {"candidates": cfg.caption.candidates, "differs": int(sum(differs)), "of": len(differs),
                               "share": float(np.mean(differs))}
    report = {
        "dataset": dataset_name(cfg), "run_dir": cfg.run_dir, "out_dir": out_dir,
        "evaluation_set": {"heldout_fraction": heldout_fraction(cfg, generated), "limit": cfg.evaluate.limit,
                           "selected": len(ids), "samples": len(sample_ids), "errors": account.errors,
                           "errors_by_reason": dict(account.errors_by_reason),
                           "this_run": {"evaluated": len(pending), "retried": len(resumed.retried),
                                        **resumed.recovered}},
        "models": {**builders.model_ids(cfg), "captioner_finetuned": run_layout.blip},
        "fid_protocol": fid_protocol(cfg),
        "mask_bucket_edges": list(cfg.evaluate.mask_buckets),
        **summary,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    # 7. Write report.md, report.html and their plots; report.json last: the pipeline skips
    #    an evaluation whose report.json exists, so it means "all written".
    tables = write_report(cfg, summary, sample_ids, out_dir)
    write_page(cfg, report, tables, out_dir, sample_ids, ids)
    write_text(out_dir.report, json.dumps(report, indent=2))
    return report


def print_report(report: dict) -> None:
    s = report["evaluation_set"]
    print(f"\nevaluation of {report['dataset']}: {s['samples']} held-out samples ({s['errors']} errors), "
          f"this run evaluated {s['this_run']['evaluated']}")
    print(f"{'':<40}{'CLIP score':>12}{'FID':>10}{'SSIM':>8}{'PSNR':>8}")
    for key, v in variants_in(report["variants"]).items():
        e = report["variants"][key]
        print(f"{v.label:<40}{fmt(e['clip_score']['mean']):>12}{fmt(e['fid']):>10}{fmt(e['ssim']['mean'], 3):>8}"
              f"{fmt(e['psnr']['mean']):>8}")
    iv = report["intervals"]
    for key in deltas_in(report["variants"]):
        print(f"{DELTA_LABELS[key]} (paired, {round(100 * iv['confidence'])} % interval): " + ", ".join(
            f"{m} {fmt_interval(iv[ALL][key][m], 3, sign=True)}" for m in (*PAIRED, "fid") if m in iv[ALL][key]))
    changed = report["changed"]
    print(f"fine-tuning changed {changed['captions']} of {changed['of']} held-out captions")
    if report.get("reranked"):
        r = report["reranked"]
        print(f"the scorer-reranked caption (of {r['candidates']} candidates) differs from the greedy one on "
              f"{r['differs']} of {r['of']}")
    print(f"report: {report['out_dir']}/report.html (tables also in report.md)")


def main(argv: list[str] | None = None) -> int:
    return job_main("evaluate", __doc__, run, print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
