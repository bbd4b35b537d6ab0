"""Evaluate: FID and CLIP score of baseline, BLIP-guided and fine-tuned-BLIP-guided inpainting.

    python -m rayjobs.evaluate [--config CONFIG.yaml] [dotted.key=value ...]

On a cluster (the tunnel, the token, logs and stop: docs/cluster.md):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.evaluate --config configs/paper-coco.yaml

Adds the fine-tuned (and scorer-reranked) captions' variants to generate's held-out rows,
inpainted from the same noise and committed once to `run_dir/eval/samples/`; then FID and
Table 1 with bootstrap intervals in `report.html`, `report.md`, `report.json` and plots.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import torch

from blipinpaint import builders, fingerprint
from blipinpaint.batches import Guarded
from blipinpaint.commit_log import CommitLog
from blipinpaint.commits import Account, sorted_ids
from blipinpaint.config import Config, dataset_name, heldout_fraction, to_yaml
from blipinpaint.errors import ConfigError, JobError
from blipinpaint.evaluation import (
    ALL,
    DELTA_LABELS,
    PAIRED,
    VARIANTS,
    Variant,
    caption_effect,
    correlation,
    deltas_in,
    fid_sets,
    summarize,
    variants_in,
)
from blipinpaint.layout import Folder, RunLayout
from blipinpaint.models import ModelRef
from blipinpaint.plots import plot_scatter
from blipinpaint.precision import survival_line
from blipinpaint.reader import committed_sample_ids, read_rows, read_sorted, row_reads
from blipinpaint.records import EVAL_SCHEMA, METRICS, RERANKED_SCHEMA, decode_images
from blipinpaint.report_markdown import fid_protocol, plot_figures, write_report
from blipinpaint.report_page import write_report_page
from blipinpaint.report_tables import fmt, fmt_interval
from blipinpaint.scorer import TARGETS, ScoreNet
from blipinpaint.seeds import heldout, sample_seed
from blipinpaint.storage import is_dir, is_file, local_dir, read_text, write_text
from blipinpaint.variant_stages import ADDED, build_added_captioners, build_added_inpainters, build_added_metrics
from rayjobs.cli import job_main
from rayjobs.cluster import connect
from rayjobs.fid_pass import compute_fid
from rayjobs.stream import TASK_RETRIES, ErrorWriter, commit_stage, model_stages, run_stream

log = logging.getLogger("blipinpaint.evaluate")

# What the generate step's held-out rows bring along.
INPUT_COLUMNS = ["id", "source", "caption", "mask_area", "noise_seed",
                 *(m + s for s in ("", "_baseline") for m in METRICS),
                 "image_png", "mask_png", "inpainted_png", "inpainted_baseline_png"]


def evaluated_variants(cfg: Config) -> dict[str, Variant]:
    """The variants this configuration evaluates: the paper's three, and the scorer-reranked
    caption's with `caption.candidates` above 1."""
    return variants_in(["baseline", "blip", "finetuned", *(["reranked"] if cfg.caption.candidates > 1 else [])])


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


def eval_schema(variants: dict[str, Variant]):
    return RERANKED_SCHEMA if "reranked" in variants else EVAL_SCHEMA


def build_dataset(cfg: Config, ledger, run_layout: RunLayout, variants: dict[str, Variant], pending: list[str],
                  owner: str | None = None) -> ray.data.Dataset:
    """The `pending` held-out rows through the added `variants`' captioner, inpainter and
    metrics pools, committed to `run_layout.eval` (`cfg`'s pools sized by `run_stream`)."""
    stream = cfg.stream
    errors = ErrorWriter(run_layout.eval, owner)
    added = [v for k, v in variants.items() if k in ADDED]
    pools = {
        "captioner": functools.partial(build_added_captioners, cfg),
        "inpainter": functools.partial(build_added_inpainters, cfg, added),
        "metrics": functools.partial(build_added_metrics, cfg, added),
    }
    reads = row_reads(run_layout.generate, pending)
    ds = ray.data.from_items(reads, override_num_blocks=len(reads))
    ds = ds.map_batches(prepare, fn_kwargs={"errors": errors, "retries": stream.batch_retries},
                        batch_size=1, num_cpus=stream.read.num_cpus, max_retries=TASK_RETRIES)
    ds = model_stages(ds, pools, stream, errors, ledger)
    return commit_stage(ds, run_layout.eval, eval_schema(variants), {}, stream.rows_per_file, stream.commit.num_cpus,
                        owner)


def check_inputs(cfg: Config, run_layout: RunLayout, variants: dict[str, Variant]) -> None:
    """Generate's rows, the fine-tuned BLIP and, to rerank captions, the trained scorer, each
    finished (its `_SUCCESS`): a step cut short leaves outputs that look whole."""
    needed = [(run_layout.generate, "rayjobs.generate"), (run_layout.finetune, "rayjobs.finetune_blip")]
    if "reranked" in variants:  # caption.candidates above 1: the trained scorer reranks them
        needed.append((run_layout.scorer, "rayjobs.train_scorer"))
    for folder, step in needed:
        if not is_file(folder.success):
            raise ConfigError(f"{folder} is not complete (no _SUCCESS): run {step} (again) first")


def held_out_ids(cfg: Config, run_layout: RunLayout, generated: list[str]) -> list[str]:
    """`evaluation_ids`, at least 2 of them (FID's covariance needs 2 images)."""
    ids = evaluation_ids(cfg, generated)
    if len(ids) < 2:
        raise ConfigError(f"only {len(ids)} held-out samples in {run_layout.generate.samples}: FID needs at least 2 "
                          f"(more inputs, or a larger train.val_fraction)")
    return ids


def evaluated_ids(out_dir: Folder, account: Account) -> list[str]:
    """The held-out samples evaluated, once every one is accounted for; at least 2 (FID)."""
    account.check(out_dir, "samples")
    sample_ids = sorted_ids(account.ok_ids).to_pylist()
    if len(sample_ids) < 2:
        raise JobError(f"{out_dir}: only {len(sample_ids)} samples evaluated, FID needs 2 (errors: "
                       f"{dict(account.errors_by_reason)}, listed in {out_dir.errors}; evaluate.retry_failed=true "
                       "tries `stage failed` rows again)")
    return sample_ids


def read_metrics(out_dir: str, ids: list[str], variants: dict[str, Variant]) -> dict[str, np.ndarray]:
    """The evaluated rows' mask area, captions and every variant's metrics, in id order."""
    return read_sorted(out_dir, ids, ["mask_area", *(v.caption for v in variants.values() if v.caption),
                                      *(m + v.suffix for v in variants.values() for m in METRICS)])


def changed_ids(columns: dict[str, np.ndarray]) -> list[str]:
    """The samples whose caption fine-tuning changed."""
    finetuned = VARIANTS["finetuned"].caption
    return [str(i) for i, a, c in zip(columns["id"], columns["caption"], columns[finetuned]) if a != c]


def scorer_on_changed(run_layout: RunLayout, ids: list[str]) -> dict:
    """For the captions fine-tuning changed (`ids`): what the frozen scorer predicts for them
    (from the fine-tuned decoder's caption features) against what their inpaintings then
    scored, with its plot. Fine-tuning follows the scorer's predictions; this says whether
    they held."""
    out_dir, model_dir = run_layout.eval, run_layout.scorer_model
    if len(ids) < 1 or not is_dir(model_dir):
        return {"samples": len(ids), "pearson_r": {t: None for t in TARGETS}}
    features = f"{VARIANTS['finetuned'].caption}_features"
    rows = read_sorted(out_dir, ids, [features, *(t + "_finetuned" for t in TARGETS)])
    scorer = ScoreNet.from_pretrained(local_dir(model_dir))
    with torch.no_grad():
        predicted = scorer.destandardize(scorer(torch.as_tensor(np.stack(rows[features]), dtype=torch.float32)))
        predicted = predicted.numpy().astype(np.float64)
    true = np.stack([np.asarray(rows[t + "_finetuned"], dtype=np.float64) for t in TARGETS], axis=1)
    plot_scatter(predicted, true, TARGETS, out_dir / "scorer_changed.png",
                 title=f"scorer's prediction for the {len(ids)} changed captions against their scores")
    return {"samples": len(ids),
            "pearson_r": {t: correlation(predicted[:, j], true[:, j]) for j, t in enumerate(TARGETS)},
            "mean_predicted": dict(zip(TARGETS, predicted.mean(axis=0).tolist())),
            "mean_scored": {t: float(np.mean(true[np.isfinite(true[:, j]), j])) for j, t in enumerate(TARGETS)}}


def other_reports(cfg: Config) -> dict[str, dict]:
    """The reports of `evaluate.other_runs` by dataset, for Table 1's other column groups."""
    reports = {}
    for other in cfg.evaluate.other_runs:
        path = RunLayout(other).eval.report
        if not is_file(path):  # e.g. that run is still going: this report is still useful
            log.warning("evaluate.other_runs: %s does not exist yet; left out of Table 1", path)
            continue
        report = json.loads(read_text(path))
        reports[report["dataset"]] = report
    return reports


def alongside(first: Callable[[], object], second: Callable[[], object]) -> tuple[object, object]:
    """(first(), second()), `second` run in a thread of its own while `first` runs: for driver
    work that would otherwise wait for Ray (the FID pass's actors starting) before it starts.
    An error of either is raised once both have ended."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate-alongside") as pool:
        other = pool.submit(second)
        return first(), other.result()


def summarize_run(cfg: Config, run_layout: RunLayout, variants: dict[str, Variant], columns: dict[str, np.ndarray],
                  fids: tuple[dict, dict], changed: list[str]) -> dict:
    """`evaluation.summarize` of the evaluated rows' `columns` and their `fids` (`compute_fid`),
    with where the caption helps, the scorer on the `changed` captions and how often the
    reranked caption differs from BLIP's."""
    bootstrap, edges = cfg.evaluate.bootstrap, list(cfg.evaluate.mask_buckets)
    summary = summarize(columns, fids[0], edges, (bootstrap.replicates, cfg.seed, bootstrap.confidence), fids[1])
    summary["intervals"]["fid_replicates"] = bootstrap.fid_replicates
    summary["caption_effect"] = caption_effect(summary, edges)
    summary["changed"]["scorer"] = scorer_on_changed(run_layout, changed)
    if "reranked" in variants:
        differs = [a != b for a, b in zip(columns["caption_reranked"], columns["caption"])]
        summary["reranked"] = {"candidates": cfg.caption.candidates, "differs": int(sum(differs)), "of": len(differs),
                               "share": float(np.mean(differs))}
    return summary


def run(cfg: Config) -> dict:
    started = time.perf_counter()
    run_layout, variants = RunLayout(cfg.run_dir), evaluated_variants(cfg)
    out_dir = run_layout.eval
    # 1. Check the inputs, choose the held-out samples, refuse rows of other settings or models.
    check_inputs(cfg, run_layout, variants)
    generated = committed_sample_ids(run_layout.generate)
    ids = held_out_ids(cfg, run_layout, generated)
    builders.fill_store(cfg)  # the inpainter, CLIP and FID networks from the model store, never the hub
    # Its rows pair with generate's: the command's generate settings and models must be theirs.
    generated_fp = fingerprint.generate(cfg)
    fingerprint.check(run_layout.generate, generated_fp, record=False)
    rows_fp = fingerprint.evaluate(cfg, generated_fp)
    fingerprint.claim(cfg, "eval", (out_dir,), rows_fp)
    write_text(out_dir.config, to_yaml(cfg))
    # 2. Resume: the held-out samples not yet evaluated.
    commit_log = CommitLog(out_dir, eval_schema(variants), compact_every=cfg.stream.compact_every)
    resumed = commit_log.resume(cfg.evaluate.retry_failed)
    pending = [i for i in ids if i not in resumed.done]
    log.info("%d held-out samples to evaluate: %d already done, %d to do", len(ids), len(ids) - len(pending),
             len(pending))
    # 3. Stream them through the added variants' captioner, inpainter and metrics.
    if pending:
        run_stream(cfg, "evaluate", out_dir, len(ids), len(ids) - len(pending), len(pending),
                   functools.partial(build_dataset, run_layout=run_layout, variants=variants, pending=pending,
                                     owner=resumed.owner))
    commit_log.release()
    # 4. Account for every held-out sample; read the metrics of those evaluated.
    account = commit_log.account(ids)
    sample_ids = evaluated_ids(out_dir, account)
    columns = read_metrics(out_dir, sample_ids, variants)
    changed = changed_ids(columns)
    # 5. FID of every variant, overall and per mask bucket, with bootstrap intervals; meanwhile
    #    this driver compares the two BLIP decoders (`decoder_survival`), whose first BLIP load
    #    imports transformers here (seconds) while the FID pass waits for its actors.
    connect(cfg.ray_address, cfg.ray_progress)
    fids, decoder_precision = alongside(
        lambda: compute_fid(cfg, out_dir, fid_sets(variants), sample_ids, changed),
        lambda: builders.decoder_survival(cfg, ModelRef(local_dir(run_layout.blip))))
    # 6. Summarize: means, paired differences and their intervals, where the caption helps.
    summary = summarize_run(cfg, run_layout, variants, columns, fids, changed)
    report = {
        "dataset": dataset_name(cfg), "run_dir": cfg.run_dir, "out_dir": out_dir,
        "evaluation_set": {"heldout_fraction": heldout_fraction(cfg, generated), "limit": cfg.evaluate.limit,
                           "selected": len(ids), "samples": len(sample_ids), "errors": account.errors,
                           "errors_by_reason": dict(account.errors_by_reason),
                           "this_run": {"evaluated": len(pending), "retried": len(resumed.retried),
                                        **resumed.recovered}},
        "models": {**builders.model_ids(cfg), "captioner_finetuned": run_layout.blip},
        # Both BLIP captions' decoders ran in `caption.decoder_dtype`: how much of the fine-tune it kept.
        "decoder_precision": decoder_precision,
        "fid_protocol": fid_protocol(cfg),
        "mask_bucket_edges": list(cfg.evaluate.mask_buckets),
        **summary,
        "fingerprint": fingerprint.report(cfg, rows_fp),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    # 7. Write the plots, report.md, report.html and report.json; `_SUCCESS` last, holding the
    #    report's fingerprint: the pipeline skips an evaluation only when it matches.
    plot_figures(cfg, report, sample_ids, out_dir)
    tables = write_report(cfg, report, other_reports(cfg), out_dir)
    write_report_page(cfg, run_layout, report, tables, sample_ids, ids)
    write_text(out_dir.report, json.dumps(report, indent=2))
    fingerprint.finish(out_dir, report["fingerprint"])
    return report


def print_report(report: dict) -> None:
    evaluation_set, intervals = report["evaluation_set"], report["intervals"]
    print(f"\nevaluation of {report['dataset']}: {evaluation_set['samples']} held-out samples "
          f"({evaluation_set['errors']} errors), this run evaluated {evaluation_set['this_run']['evaluated']}")
    print(f"{'':<40}{'CLIP score':>12}{'FID':>10}{'SSIM':>8}{'PSNR':>8}")
    for key, variant in variants_in(report["variants"]).items():
        block = report["variants"][key]
        print(f"{variant.label:<40}{fmt(block['clip_score']['mean']):>12}{fmt(block['fid']):>10}"
              f"{fmt(block['ssim']['mean'], 3):>8}{fmt(block['psnr']['mean']):>8}")
    for key in deltas_in(report["variants"]):
        overall = intervals[ALL][key]
        print(f"{DELTA_LABELS[key]} (paired, {round(100 * intervals['confidence'])} % interval): " + ", ".join(
            f"{m} {fmt_interval(overall[m], 3, sign=True)}" for m in (*PAIRED, "fid") if m in overall))
    changed = report["changed"]
    print(f"fine-tuning changed {changed['captions']} of {changed['of']} held-out captions; BLIP's and the "
          f"fine-tuned {survival_line(report['decoder_precision'])}")
    if report.get("reranked"):
        reranked = report["reranked"]
        print(f"the scorer-reranked caption (of {reranked['candidates']} candidates) differs from the greedy one on "
              f"{reranked['differs']} of {reranked['of']}")
    print(f"report: {Folder(report['out_dir']) / 'report.html'} (tables also in report.md)")


def main(argv: list[str] | None = None) -> int:
    return job_main("evaluate", __doc__, run, print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
