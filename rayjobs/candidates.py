"""Caption candidates for reward-ranked fine-tuning: each training image's candidates, inpainted and scored.

On a GPU cluster (README, "Running on a cluster"; `~/.ray/auth_token` made first):

    ray up cluster.yaml && ray dashboard cluster.yaml &    # job API tunnelled to 127.0.0.1:8265
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.candidates --config configs/paper-coco.yaml caption.candidates=4
    RAY_AUTH_MODE=token ray job logs --address http://127.0.0.1:8265 --follow <submission id>
    RAY_AUTH_MODE=token ray job stop --address http://127.0.0.1:8265 <submission id>
    ray down cluster.yaml                                  # when every job is done

Locally (a Ray on 127.0.0.1 when no address is given):

    python -m rayjobs.candidates [--config CONFIG.yaml] caption.candidates=4 [dotted.key=value ...]

For every training image of `run_dir/generate/samples` (the split every job uses), the
original BLIP proposes `caption.candidates` captions: the greedy one (generate's) and
nucleus-sampled ones, seeded per image. Ray Data streams the rows through: read + decode
(CPU tasks) -> Captioner actors (an image in, a row per candidate out, id `<image id>#<k>`)
-> Inpainter actors (every candidate from the image's own noise seed, generate's: only the
caption differs) -> metrics actors (SSIM, PSNR, CLIP score) -> an exactly-once Parquet
writer. Candidate 0's row therefore repeats generate's guided inpainting and metrics.
`finetune.method=reward_ranked` then trains BLIP on each image's candidate of lowest
L_BLIP. Killed at any point and run again, the job does the (image, candidate) rows that
are missing, once each.

Outputs under `run_dir/candidates/`: `samples/*.parquet` (`records.CANDIDATE_SCHEMA`),
`errors/*.parquet` (an error row per candidate that could not be scored), `stats.json`,
`config.yaml` and `_SUCCESS` once every candidate is accounted for.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections import Counter

import numpy as np
import ray

from blipinpaint import builders
from blipinpaint.batches import Batch, Guarded
from blipinpaint.candidates import PENDING, SharedNoise, best_candidates, candidate_id, expand, pending_text
from blipinpaint.config import Config, to_yaml
from blipinpaint.errors import ConfigError
from blipinpaint.io import decode_png
from blipinpaint.records import CANDIDATE_SCHEMA
from blipinpaint.storage import is_dir, write_text
from blipinpaint.writer import CommitLog
from rayjobs import models, training
from rayjobs.common import connect, job_main, read_rows, row_reads, size_pools
from rayjobs.generate import candidate_fingerprint, check_fingerprint, fingerprint, stage_failure
from rayjobs.progress import CommitProgress
from rayjobs.stream import ErrorWriter, attempt_ledger, commit_stage, job_errors, model_stages

log = logging.getLogger("blipinpaint.candidates")

# What generate's training rows bring along (its caption is candidate 0).
INPUT_COLUMNS = ["id", "source", "caption", "mask_area", "noise_seed", "image_png", "mask_png"]
# What ranking the candidates reads back.
RANK_COLUMNS = ["id", "image_id", "candidate", "caption", "mask_area", "ssim", "psnr", "clip_score"]


def _paths(cfg: Config) -> dict[str, str]:
    root = cfg.run_dir.rstrip("/")
    return {"generate": f"{root}/generate", "out": f"{root}/candidates"}


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
    def decode(rows):
        return {**rows, "image": np.stack([decode_png(x) for x in rows["image_png"]]),
                "mask": np.stack([(decode_png(x) > 127).astype(np.uint8) for x in rows["mask_png"]])}

    rows = read_rows(batch, INPUT_COLUMNS)
    pending = {}
    for each in batch[PENDING]:
        pending.update(json.loads(each))
    rows[PENDING] = np.array([pending[str(i)] for i in rows["id"]], dtype=object)
    rows["error"] = np.full(len(rows["id"]), "", dtype=object)
    return Guarded("prepare", decode, errors, retries)(rows)


def _inpainter(cfg: Config) -> SharedNoise:
    return SharedNoise(builders.build_inpainter(cfg, {"inpainted": "caption"}))


def build_dataset(cfg: Config, reads: list[dict], ledger, owner: str | None = None) -> ray.data.Dataset:
    """The stream from generate's parts (`reads`: path, ids, pending candidates) to committed
    candidate rows; every write carries the run's `owner` token."""
    g, out_dir = cfg.generate, _paths(cfg)["out"]
    errors = CandidateErrors(out_dir, owner)
    pools = {
        "captioner": functools.partial(builders.build_candidate_captioner, cfg),
        "inpainter": functools.partial(_inpainter, cfg),
        "metrics": functools.partial(builders.build_metrics, cfg, {"": ("inpainted", "caption")}),
    }
    ds = ray.data.from_items(reads, override_num_blocks=max(len(reads), 1))
    ds = ds.map_batches(prepare, fn_kwargs={"errors": errors, "retries": g.batch_retries},
                        batch_size=1, num_cpus=g.read.num_cpus)
    ds = model_stages(ds, pools, g, errors, ledger)
    return commit_stage(ds, out_dir, CANDIDATE_SCHEMA, builders.model_ids(cfg), g.rows_per_file, g.read.num_cpus,
                        owner)


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


def read_candidates(out_dir: str, image_ids: set[str] | None = None) -> dict[str, np.ndarray]:
    """The committed candidate rows (`RANK_COLUMNS`), of the images `image_ids` only if given."""
    parts = CommitLog(out_dir, CANDIDATE_SCHEMA).committed_samples()
    ids = [i for ids_here in parts.values() for i in ids_here
           if image_ids is None or i.rsplit("#", 1)[0] in image_ids]
    reads = row_reads(out_dir, ids, parts)
    if not reads:
        return {c: np.array([], dtype=object) for c in RANK_COLUMNS}
    return read_rows({"path": [r["path"] for r in reads], "ids": [r["ids"] for r in reads]}, RANK_COLUMNS)


def best_captions(cfg: Config, image_ids: set[str] | None = None) -> dict[str, dict]:
    """Per image with candidate rows (of `image_ids` only, if given): the candidate of lowest
    real L_BLIP, with the run's λs (`blipinpaint.candidates.best_candidates`)."""
    return best_candidates(read_candidates(_paths(cfg)["out"], image_ids), builders.loss_weights(cfg),
                           cfg.inpaint.caption_max_mask_area)


def summarize(cfg: Config, images: list[str], commit_log: CommitLog, this_run: dict) -> dict:
    """Account for every (training image, candidate) pair and write `stats.json` (and
    `_SUCCESS` when complete): counts, errors by reason, and how often the greedy caption
    is already the best candidate."""
    out_dir, n = _paths(cfg)["out"], cfg.caption.candidates
    markers = commit_log.markers()
    seen = Counter(i for m in markers for i in (*m["samples"], *m["errors"]))
    listed = {candidate_id(i, k) for i in images for k in range(n)}
    ok = {i for m in markers for i in m["samples"]} & listed
    reasons = Counter(k for m in markers for i, k in zip(m["errors"], m["error_kinds"]) if i in listed)
    seconds, retries = Counter(), Counter()
    for m in markers:
        seconds.update(m["seconds"])
        retries.update(m["retries"])
    rows = read_candidates(out_dir, set(images))
    best = best_candidates(rows, builders.loss_weights(cfg))
    means = {}
    if ok:
        for metric in ("ssim", "psnr", "clip_score"):
            values = np.asarray(rows[metric], dtype=np.float64)
            first, others = values[np.asarray(rows["candidate"]) == 0], values[np.asarray(rows["candidate"]) > 0]
            means[metric] = {"greedy": _finite_mean(first), "sampled": _finite_mean(others)}
    stats = {
        "out_dir": out_dir, "images": len(images), "candidates_per_image": n, "rows": len(listed), "ok": len(ok),
        "errors": sum(reasons.values()), "errors_by_reason": dict(sorted(reasons.items())),
        "missing": len(listed - set(seen)), "duplicates": sum(c - 1 for c in seen.values() if c > 1),
        "images_ranked": len(best), "images_without_candidates": len(images) - len(best),
        # The headroom of reward-ranked fine-tuning: where greedy decoding already gives the best.
        "best_is_greedy": sum(b["candidate"] == 0 for b in best.values()),
        "mean_loss": {"greedy": _finite_mean([b["greedy_loss"] for b in best.values() if b["greedy_loss"] is not None]),
                      "best": _finite_mean([b["loss"] for b in best.values()])},
        "means": means,
        "this_run": this_run,
        "retries": sum(retries.values()),
        "stages": {s: {"busy_s": round(t, 3), "retries": retries[s]} for s, t in seconds.items()},
    }
    write_text(f"{out_dir}/stats.json", json.dumps(stats, indent=2))
    if stats["missing"] == 0 and stats["duplicates"] == 0:
        write_text(f"{out_dir}/_SUCCESS", "")
    return stats


def _finite_mean(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]  # a hole restored exactly has infinite PSNR
    return float(finite.mean()) if finite.size else None


def run(cfg: Config) -> dict:
    started = time.perf_counter()
    paths = _paths(cfg)
    out_dir, n = paths["out"], cfg.caption.candidates
    if not is_dir(f"{paths['generate']}/samples"):
        raise ConfigError(f"{paths['generate']}/samples is missing: run rayjobs.generate first")
    if n < 2:
        raise ConfigError(f"caption.candidates={n}: candidates to rank need 2 or more per image")
    # Candidate 0 repeats generate's caption from generate's noise: the same settings, or the
    # candidates would not compare with each other across reruns, nor with generate's rows.
    check_fingerprint(paths["generate"], fingerprint(cfg), record=False)
    train_reads, _ = training.split_reads(cfg)
    check_fingerprint(out_dir, candidate_fingerprint(cfg))
    write_text(f"{out_dir}/config.yaml", to_yaml(cfg))
    models.run(cfg)  # the captioner, inpainter and CLIP from the model store, never the hub
    commit_log = CommitLog(out_dir, CANDIDATE_SCHEMA)
    owner = commit_log.take_over()  # before recovering: a killed run's stragglers stop committing
    recovered = commit_log.recover()
    retried = commit_log.uncommit(stage_failure) if cfg.generate.retry_failed else []
    done = commit_log.committed_ids()
    images = sorted(i for r in train_reads for i in r["ids"])
    # Pending per candidate, not per image: a killed run may have committed some of an image's.
    pending = {i: [k for k in range(n) if candidate_id(i, k) not in done] for i in images}
    pending = {i: ks for i, ks in pending.items() if ks}
    rows = sum(len(ks) for ks in pending.values())
    log.info("%d training images, %d candidates each: %d rows already committed, %d to do", len(images), n,
             len(images) * n - rows, rows)

    pipeline_s = 0.0
    if pending:
        reads = read_tasks(train_reads, pending, cfg.generate.read.batch_size)
        connect(cfg.ray_address, cfg.ray_progress)
        # Sized by images, not rows: a read task's block (`read_tasks`) reaches one inpainter
        # with all its images' candidates, so more inpainters than blocks would sit idle.
        cfg = size_pools(cfg, len(pending))
        t0 = time.perf_counter()
        with (attempt_ledger() as ledger, job_errors(),
              CommitProgress("candidates", out_dir, len(images) * n, len(images) * n - rows, cfg.progress_s)):
            ds = build_dataset(cfg, reads, ledger, owner).materialize()
        pipeline_s = time.perf_counter() - t0
        write_text(f"{out_dir}/ray_stats.txt", ds.stats())
    this_run = {"processed": rows, "images": len(pending), "skipped_committed": len(images) * n - rows,
                "retried_failed": len(retried), **recovered, "pipeline_s": round(pipeline_s, 2),
                "wall_s": round(time.perf_counter() - started, 2),
                "rows_per_s": round(rows / pipeline_s, 3) if pipeline_s else None}
    stats = summarize(cfg, images, commit_log, this_run)
    commit_log.release()
    if stats["missing"] or stats["duplicates"]:
        raise RuntimeError(f"{out_dir}: {stats['missing']} candidates missing, {stats['duplicates']} duplicated; "
                           "run the same command again to finish")
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
