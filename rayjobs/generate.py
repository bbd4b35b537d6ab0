"""Generate scorer training data: masked images -> BLIP captions -> SD inpainting -> metrics.

On a GPU cluster (README, "Running on a cluster"; `~/.ray/auth_token` made first):

    ray up cluster.yaml && ray dashboard cluster.yaml &    # job API tunnelled to 127.0.0.1:8265
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.generate --config configs/paper-coco.yaml
    RAY_AUTH_MODE=token ray job logs --address http://127.0.0.1:8265 --follow <submission id>
    RAY_AUTH_MODE=token ray job stop --address http://127.0.0.1:8265 <submission id>
    ray down cluster.yaml                                  # when every job is done

Locally (a Ray on 127.0.0.1 when no address is given):

    python -m rayjobs.generate [--config CONFIG.yaml] [dotted.key=value ...]

Ray Data streams the inputs through: read + decode + validate + mask (CPU tasks) ->
Captioner actors -> Inpainter actors -> metrics actors -> PNG encoding (CPU tasks) ->
an exactly-once Parquet writer. Memory stays bounded: nothing is materialised or
collected on the driver. Killed at any point and run again with the same command, the
job skips what was committed, finishes or undoes what was in flight, and does the rest.

Outputs under `run_dir/generate/`: `samples/*.parquet`, `errors/*.parquet`, `stats.json`,
`config.yaml` and `_SUCCESS` once every input is accounted for.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from omegaconf import OmegaConf
from pyarrow import fs as pafs

from blipinpaint import stages
from blipinpaint.batches import Guarded, split_errors
from blipinpaint.config import Config, sample_images_dir, to_yaml
from blipinpaint.errors import ConfigError
from blipinpaint.records import METRIC_COLUMNS, SAMPLE_SCHEMA
from blipinpaint.source_reads import read_files
from blipinpaint.sources import SourceError, list_inputs
from blipinpaint.storage import filesystem, write_text
from blipinpaint.writer import CommitLog
from rayjobs import models
from rayjobs.common import connect, job_main, size_pools
from rayjobs.progress import CommitProgress
from rayjobs.stream import ErrorWriter, attempt_ledger, commit_stage, job_errors, model_stages

log = logging.getLogger("blipinpaint.generate")

MODEL_STAGES = {"captioner": stages.build_captioner, "inpainter": stages.build_inpainter,
                "metrics": stages.build_metrics}
# Sections whose change makes earlier rows incomparable with new ones.
FINGERPRINT_KEYS = ("seed", "models.preset", "models.device", "models.dtype", "models.captioner", "models.inpainter",
                    "models.clip", "masks", "caption", "inpaint", "data.image_size", "data.min_side",
                    "data.max_aspect_ratio", "data.max_file_mb", "scorer.feature_layer")


def _out_dir(cfg: Config) -> str:
    return f"{cfg.run_dir.rstrip('/')}/generate"


def prepare(batch, cfg: Config, errors: ErrorWriter):
    """CPU task: read the file, decode, validate, resize, mask; unusable inputs leave here.

    Unusable rows are committed after the guarded part, never inside it: a retried batch
    must not commit them twice.
    """
    decode, mask = stages.build_decoder(cfg), stages.build_masker(cfg)
    read = functools.partial(read_files, max_mb=cfg.data.max_file_mb, image_column=cfg.data.image_column)
    out = Guarded("prepare", lambda b: mask(decode(read(b))), errors, cfg.generate.batch_retries)(batch)
    return split_errors(out, errors)


def build_dataset(cfg: Config, pending: list[dict], ledger, owner: str | None = None) -> ray.data.Dataset:
    """The stream from `pending` inputs to encoded rows; every write carries the run's `owner` token."""
    g, errors = cfg.generate, ErrorWriter(_out_dir(cfg), owner)
    blocks = max(1, math.ceil(len(pending) / g.read.batch_size))
    ds = ray.data.from_items(pending, override_num_blocks=blocks)
    ds = ds.map_batches(prepare, fn_kwargs={"cfg": cfg, "errors": errors}, batch_size=g.read.batch_size,
                        num_cpus=g.read.num_cpus)
    ds = model_stages(ds, {name: functools.partial(build, cfg) for name, build in MODEL_STAGES.items()}, g, errors,
                      ledger)
    return commit_stage(ds, _out_dir(cfg), SAMPLE_SCHEMA, stages.model_ids(cfg), g.rows_per_file, g.read.num_cpus,
                        owner)


def stage_failure(marker: dict) -> bool:
    """A part holding only rows of a batch a model stage failed on (raised, or its worker died)."""
    kinds = marker["error_kinds"]
    return not marker["samples"] and bool(kinds) and all(kind == "stage failed" for kind in kinds)


def fingerprint(cfg: Config) -> dict:
    """The settings a sample's row depends on."""
    conf = OmegaConf.to_container(OmegaConf.structured(cfg))
    out = {}
    for key in FINGERPRINT_KEYS:
        value = conf
        for part in key.split("."):
            value = value[part]
        out[key] = value
    # Candidates change evaluate's and the candidate stream's rows, not these (`candidate_fingerprint`).
    out["caption"].pop("candidates", None)
    if out["inpaint"].get("caption_max_mask_area") is None:
        # At its default, as before the key existed: runs made then still match.
        out["inpaint"].pop("caption_max_mask_area", None)
    return out


def candidate_fingerprint(cfg: Config) -> dict:
    """`fingerprint`, and the number of caption candidates (None at 1: a folder made before
    the key existed still matches, and one made with candidates refuses a run without)."""
    n = cfg.caption.candidates
    return {**fingerprint(cfg), "caption.candidates": n if n > 1 else None}


def check_fingerprint(out_dir: str, current: dict, record: bool = True) -> None:
    """Refuse to mix rows made under different settings (`current`) in one output folder;
    a folder without rows yet records `current` (unless `record` is False: a reader's check)."""
    fs, root = filesystem(out_dir)
    path = f"{root}/fingerprint.json"
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            previous = json.loads(f.read())
        changed = sorted(k for k in current if previous.get(k) != current[k])
        if changed:
            raise ConfigError(
                f"{out_dir} holds rows generated with other settings ({', '.join(changed)} differ); "
                "use another run_dir, or restore those settings to resume"
            )
        return
    if not record:
        return
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(current, indent=2).encode())


def summarize(out_dir: str, items: list[dict], commit_log: CommitLog, this_run: dict) -> dict:
    """Account for every listed input and write `stats.json` (and `_SUCCESS` when complete)."""
    markers = commit_log.markers()
    seen = Counter(i for m in markers for i in (*m["samples"], *m["errors"]))
    listed = {it["id"] for it in items}
    sample_ids = {i for m in markers for i in m["samples"]} & listed
    reasons = Counter(k for m in markers for i, k in zip(m["errors"], m["error_kinds"]) if i in listed)
    seconds, retries = Counter(), Counter()
    rows = sum(len(m["samples"]) + len(m["errors"]) for m in markers)
    for m in markers:
        seconds.update(m["seconds"])
        retries.update(m["retries"])
    stats = {
        "out_dir": out_dir, "inputs": len(listed), "ok": len(sample_ids), "errors": sum(reasons.values()),
        "errors_by_reason": dict(sorted(reasons.items())),
        "missing": len(listed - set(seen)), "duplicates": sum(c - 1 for c in seen.values() if c > 1),
        "this_run": this_run,
        # Failed attempts (a stage raising, or its worker dying) on batches that were committed.
        "retries": sum(retries.values()),
        # Busy time per stage over all committed rows: rows per second of one worker.
        "stages": {s: {"busy_s": round(t, 3), "rows_per_s_per_worker": round(rows / t, 3) if t else None,
                       "retries": retries[s]}
                   for s, t in seconds.items()},
        "means": {},
    }
    if sample_ids:
        fs, root = filesystem(out_dir)
        table = pq.read_table(f"{root}/samples", filesystem=fs, columns=["id", *METRIC_COLUMNS])
        table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(sorted(sample_ids))))
        for m in METRIC_COLUMNS:
            values = table.column(m).to_numpy(zero_copy_only=False)
            finite = values[np.isfinite(values)]  # a perfect hole has infinite PSNR
            stats["means"][m] = float(finite.mean()) if finite.size else None
    write_text(f"{out_dir}/stats.json", json.dumps(stats, indent=2))
    if stats["missing"] == 0 and stats["duplicates"] == 0:
        write_text(f"{out_dir}/_SUCCESS", "")
    return stats


def run(cfg: Config) -> dict:
    started = time.perf_counter()
    out_dir = _out_dir(cfg)
    try:  # listing first: a bad source fails before anything is written
        items = list_inputs(cfg.data.source or str(sample_images_dir()), cfg.data.kind, cfg.data.image_root,
                            cfg.data.limit, cfg.seed, cfg.data.image_column, cfg.data.id_column)
    except SourceError as err:
        raise ConfigError(str(err)) from None
    check_fingerprint(out_dir, fingerprint(cfg))
    write_text(f"{out_dir}/config.yaml", to_yaml(cfg))
    models.run(cfg)  # hub checkpoints into the model store before any actor loads one
    commit_log = CommitLog(out_dir)
    owner = commit_log.take_over()  # before recovering: a killed run's stragglers stop committing
    recovered = commit_log.recover()
    # A batch that failed in a model stage often failed for its machine (preempted, out of
    # memory), not for its images: on request, its rows are tried again.
    retried = commit_log.uncommit(stage_failure) if cfg.generate.retry_failed else []
    done = commit_log.committed_ids()
    pending = [it for it in items if it["id"] not in done]
    log.info("%d inputs: %d already committed, %d to do", len(items), len(items) - len(pending), len(pending))

    pipeline_s = 0.0
    if pending:
        connect(cfg.ray_address, cfg.ray_progress)
        cfg = size_pools(cfg, len(pending))
        t0 = time.perf_counter()
        with (attempt_ledger() as ledger, job_errors(),
              CommitProgress("generate", out_dir, len(items), len(items) - len(pending), cfg.progress_s)):
            ds = build_dataset(cfg, pending, ledger, owner).materialize()  # {part, rows} per commit
        pipeline_s = time.perf_counter() - t0
        write_text(f"{out_dir}/ray_stats.txt", ds.stats())
    this_run = {
        "processed": len(pending), "skipped_committed": len(items) - len(pending), "retried_failed": len(retried),
        **recovered,
        "pipeline_s": round(pipeline_s, 2), "wall_s": round(time.perf_counter() - started, 2),
        "images_per_s": round(len(pending) / pipeline_s, 3) if pipeline_s else None,
    }
    stats = summarize(out_dir, items, commit_log, this_run)
    commit_log.release()
    if stats["missing"] or stats["duplicates"]:
        raise RuntimeError(f"{out_dir}: {stats['missing']} inputs missing, {stats['duplicates']} duplicated; "
                           "run the same command again to finish")
    return stats


def print_summary(stats: dict) -> None:
    run_ = stats["this_run"]
    reasons = f" {stats['errors_by_reason']}" if stats["errors_by_reason"] else ""
    print(f"\n{stats['inputs']} inputs: {stats['ok']} samples, {stats['errors']} errors{reasons}; "
          f"this run processed {run_['processed']} "
          f"(skipped {run_['skipped_committed']} already committed) in {run_['wall_s']} s")
    if stats["means"]:
        print(f"{'metric':<12}{'guided':>10}{'baseline':>10}")
        for m in ("ssim", "psnr", "ssim_hole", "psnr_hole", "clip_score"):
            print(f"{m:<12}{stats['means'][m]:>10.3f}{stats['means'][m + '_baseline']:>10.3f}")
    print(f"outputs in {stats['out_dir']}")


def main(argv: list[str] | None = None) -> int:
    return job_main("generate", __doc__, run, print_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
