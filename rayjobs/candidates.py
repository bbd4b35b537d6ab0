"""Caption candidates for reward-ranked fine-tuning: each training image's candidates, inpainted and scored.

    python -m rayjobs.candidates [--config CONFIG.yaml] caption.candidates=4 [dotted.key=value ...]

On a cluster (the tunnel, the token, logs and stop: docs/cluster.md):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.candidates --config configs/paper-coco.yaml caption.candidates=4

The original BLIP proposes `caption.candidates` captions per training image (the greedy
one, generate's, and seeded nucleus samples); each is a row `<image id>#<k>`, inpainted
from the image's own noise seed (only the caption differs) and scored with the real
metrics, exactly once. `finetune.method=reward_ranked` trains BLIP on each image's
candidate of lowest L_BLIP. Writes `run_dir/candidates/` as generate writes its folder.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time

import numpy as np
import ray

from blipinpaint import builders, fingerprint
from blipinpaint.batches import Batch, Guarded
from blipinpaint.candidates import PENDING, SharedNoise, best_candidates, candidate_id, expand, pending_text
from blipinpaint.commit_log import CommitLog
from blipinpaint.commits import Account
from blipinpaint.config import Config, to_yaml
from blipinpaint.errors import ConfigError
from blipinpaint.layout import RunLayout
from blipinpaint.reader import read_candidates, read_rows, split_reads
from blipinpaint.records import CANDIDATE_SCHEMA, decode_images
from blipinpaint.storage import is_file, write_text
from rayjobs.cli import job_main
from rayjobs.stream import TASK_RETRIES, ErrorWriter, commit_stage, model_stages, run_stream

log = logging.getLogger("blipinpaint.candidates")

# What generate's training rows bring along (its caption is candidate 0).
INPUT_COLUMNS = ["id", "source", "caption", "mask_area", "noise_seed", "image_png", "mask_png"]


class CandidateErrors(ErrorWriter):
    """`ErrorWriter` for this stream: an image that fails before its candidates exist (an
    undecodable PNG, a captioner batch that keeps failing) becomes an error row per pending
    candidate, so that every (image, candidate) pair is in samples or errors exactly once."""

    def __call__(self, rows: Batch) -> None:
        super().__call__(rows if "image_id" in rows else expand(rows)[0])


def prepare(batch: dict, errors: ErrorWriter, retries: int) -> dict:
    """CPU task: read the training rows of a part (generate's), with each image's pending
    candidates; the ground truth and mask as arrays again. An undecodable row becomes error
    rows; a part that cannot be read (storage, not data) fails the task, which Ray retries."""
    rows = read_rows(batch, INPUT_COLUMNS)
    pending = {}
    for each in batch[PENDING]:
        pending.update(json.loads(each))
    rows[PENDING] = np.array([pending[str(i)] for i in rows["id"]], dtype=object)
    rows["error"] = np.full(len(rows["id"]), "", dtype=object)
    return Guarded("prepare", decode_images, errors, retries)(rows)


def _inpainter(cfg: Config) -> SharedNoise:
    return SharedNoise(builders.build_inpainter(cfg, {"inpainted": "caption"}))


def build_dataset(cfg: Config, reads: list[dict], ledger, owner: str | None = None) -> ray.data.Dataset:
    """The stream from generate's parts (`reads`: path, ids, pending candidates) to committed
    candidate rows; every write carries the run's `owner` token."""
    stream, out_dir = cfg.stream, RunLayout(cfg.run_dir).candidates
    errors = CandidateErrors(out_dir, owner)
    pools = {
        "captioner": functools.partial(builders.build_candidate_captioner, cfg),
        "inpainter": functools.partial(_inpainter, cfg),
        "metrics": functools.partial(builders.build_metrics, cfg, {"": ("inpainted", "caption")}),
    }
    ds = ray.data.from_items(reads, override_num_blocks=max(len(reads), 1))
    # Reads of generate's own parts (a dying reader is the machine's fault, not an input's):
    # retried a bounded number of times.
    ds = ds.map_batches(prepare, fn_kwargs={"errors": errors, "retries": stream.batch_retries},
                        batch_size=1, num_cpus=stream.read.num_cpus, max_retries=TASK_RETRIES)
    ds = model_stages(ds, pools, stream, errors, ledger)
    return commit_stage(ds, out_dir, CANDIDATE_SCHEMA, builders.model_ids(cfg), stream.rows_per_file,
                        stream.commit.num_cpus, owner, ledger)


def read_tasks(train_reads: list[dict], pending: dict[str, list[int]], images: int) -> list[dict]:
    """Read tasks of at most `images` images with pending candidates (and which), each from one
    of generate's parts (several tasks may read one part).

    Each task's rows travel on as one block, and a block goes to one actor of each pool (the
    captioner's output, `candidates` rows per image, is one block too): blocks of a few
    images keep every inpainter busy and commits coming, where a block per part (64 images
    by default) would leave one inpainter working through a part's candidates alone."""
    tasks = []
    for r in train_reads:
        chosen = [i for i in r["ids"] if i in pending]
        for at in range(0, len(chosen), images):
            ids = chosen[at:at + images]
            tasks.append({"path": r["path"], "ids": ids,
                          PENDING: json.dumps({i: pending_text(pending[i]) for i in ids})})
    return tasks


def summarize(cfg: Config, images: list[str], account: Account, this_run: dict) -> dict:
    """The run's `stats.json`: every (training image, candidate) pair accounted for, and how
    often the greedy caption is already the best candidate."""
    out_dir = RunLayout(cfg.run_dir).candidates
    rows = read_candidates(out_dir, set(images))
    best = best_candidates(rows, builders.loss_weights(cfg))
    means = {}
    if len(account.ok_ids):
        candidate = np.asarray(rows["candidate"])
        for metric in ("ssim", "psnr", "clip_score"):
            values = np.asarray(rows[metric], dtype=np.float64)
            means[metric] = {"greedy": _finite_mean(values[candidate == 0]),
                             "sampled": _finite_mean(values[candidate > 0])}
    return {
        "out_dir": out_dir, "images": len(images), "candidates_per_image": cfg.caption.candidates,
        "rows": account.listed, "ok": account.ok_count, "errors": account.errors,
        "errors_by_reason": dict(sorted(account.errors_by_reason.items())),
        "missing": len(account.missing_ids), "duplicates": account.duplicates,
        "images_ranked": len(best), "images_without_candidates": len(images) - len(best),
        # The headroom of reward-ranked fine-tuning: where greedy decoding already gives the best.
        "best_is_greedy": sum(b["candidate"] == 0 for b in best.values()),
        "mean_loss": {"greedy": _finite_mean([b["greedy_loss"] for b in best.values() if b["greedy_loss"] is not None]),
                      "best": _finite_mean([b["loss"] for b in best.values()])},
        "means": means,
        "this_run": this_run,
        "retries": sum(account.retries.values()),
        "reruns": account.reruns_by_cause(),
        "stages": {s: {"busy_s": figures["busy_s"], "retries": figures["retries"]}
                   for s, figures in account.stages().items()},
    }


def _finite_mean(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]  # a hole restored exactly has infinite PSNR
    return float(finite.mean()) if finite.size else None


def run(cfg: Config) -> dict:
    started = time.perf_counter()
    run_layout, n = RunLayout(cfg.run_dir), cfg.caption.candidates
    out_dir = run_layout.candidates
    # 1. Check the inputs: generate's rows, made with these settings (candidate 0 repeats
    #    generate's caption from generate's noise), and candidates to rank.
    if not is_file(run_layout.generate.success):
        raise ConfigError(f"{run_layout.generate} is not complete (no _SUCCESS): run rayjobs.generate (again) first")
    if n < 2:
        raise ConfigError(f"caption.candidates={n}: candidates to rank need 2 or more per image")
    builders.fill_store(cfg)  # the captioner, inpainter and CLIP from the model store, never the hub
    generated = fingerprint.generate(cfg)  # the models hashed once for both checks
    fingerprint.check(run_layout.generate, generated, record=False)
    train_reads, _ = split_reads(cfg)
    current = fingerprint.candidates(cfg, generated)
    fingerprint.claim(cfg, "candidates", (out_dir,), current)
    write_text(out_dir.config, to_yaml(cfg))
    # 2. Resume, pending per candidate (a killed run may have committed some of an image's).
    commit_log = CommitLog(out_dir, CANDIDATE_SCHEMA, compact_every=cfg.stream.compact_every)
    resumed = commit_log.resume(cfg.stream.retry_failed)
    images = sorted(i for r in train_reads for i in r["ids"])
    pending = {i: [k for k in range(n) if candidate_id(i, k) not in resumed.done] for i in images}
    pending = {i: ks for i, ks in pending.items() if ks}
    rows, total = sum(len(ks) for ks in pending.values()), len(images) * n
    log.info("%d training images, %d candidates each: %d rows already committed, %d to do", len(images), n,
             total - rows, rows)
    # 3. Stream what is left. Pools are sized by images, not rows: a read task's block
    #    (`read_tasks`) reaches one inpainter with all its images' candidates.
    pipeline_s, restarts = 0.0, {}
    if pending:
        reads = read_tasks(train_reads, pending, cfg.stream.read.batch_size)
        pipeline_s, restarts = run_stream(cfg, "candidates", out_dir, total, total - rows, len(pending),
                                lambda cfg, ledger: build_dataset(cfg, reads, ledger, resumed.owner))
    # 4. Account for every pair.
    this_run = {"processed": rows, "images": len(pending), "skipped_committed": total - rows,
                "retried_failed": len(resumed.retried), **resumed.recovered, "pipeline_s": round(pipeline_s, 2),
                "wall_s": round(time.perf_counter() - started, 2),
                "rows_per_s": round(rows / pipeline_s, 3) if pipeline_s else None,
                "restarts": restarts}  # of the pools' actors, by stage and cause
    account = commit_log.account([candidate_id(i, k) for i in images for k in range(n)])
    stats = {**summarize(cfg, images, account, this_run), "fingerprint": current}
    commit_log.finish(stats, account, "candidates", success=json.dumps(current, indent=2))
    return stats


def print_report(stats: dict) -> None:
    run_ = stats["this_run"]
    reasons = f" {stats['errors_by_reason']}" if stats["errors_by_reason"] else ""
    print(f"\n{stats['images']} training images x {stats['candidates_per_image']} candidates: {stats['ok']} scored, "
          f"{stats['errors']} errors{reasons}; this run processed {run_['processed']} "
          f"(skipped {run_['skipped_committed']} already committed) in {run_['wall_s']} s")
    if stats["images_ranked"]:
        loss = stats["mean_loss"]
        print(f"the greedy caption is the best candidate (lowest real L_BLIP) for {stats['best_is_greedy']} of "
              f"{stats['images_ranked']} images; mean L_BLIP greedy {_fmt(loss['greedy'])}, "
              f"best {_fmt(loss['best'])}")
        print(f"{'metric':<12}{'greedy':>10}{'sampled':>10}")
        for metric, m in stats["means"].items():
            print(f"{metric:<12}{_fmt(m['greedy']):>10}{_fmt(m['sampled']):>10}")
    if stats["images_without_candidates"]:
        print(f"{stats['images_without_candidates']} images have no scored candidate: fine-tuning leaves them out")
    print(f"outputs in {stats['out_dir']}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    return job_main("candidates", __doc__, run, print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
