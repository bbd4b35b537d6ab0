"""Generate scorer training data: masked images -> BLIP captions -> SD inpainting -> metrics.

    python -m rayjobs.generate [--config CONFIG.yaml] [dotted.key=value ...]

On a cluster (the tunnel, the token, logs and stop: docs/cluster.md):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.generate --config configs/paper-coco.yaml

Ray Data streams the inputs through read + decode + validate + mask (CPU tasks), the
Captioner, Inpainter and metrics actors, and an exactly-once Parquet writer, in bounded
memory. A WebDataset source is listed inside the stream, a shard group per read task
(`list_pending`), the committed ids dropped there: the driver holds shard names. Killed and
run again, the job finishes or undoes what was in flight and does the rest. Writes
`run_dir/generate/`: `samples/`, `errors/`, `stats.json`, `config.yaml`, and `_SUCCESS` once
every input is accounted for. With `dry_run=true` it only plans (`blipinpaint.plan`): it
lists and reads the commit log, prints what a run would do and cost, and writes
`run_dir/plan.json`, nothing else.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from blipinpaint import builders, fingerprint, plan
from blipinpaint.batches import Guarded, split_errors
from blipinpaint.commit_log import CommitLog
from blipinpaint.commits import Account
from blipinpaint.config import Config, sample_images_dir, to_yaml
from blipinpaint.errors import ConfigError
from blipinpaint.layout import RunLayout
from blipinpaint.records import METRIC_COLUMNS, SAMPLE_SCHEMA
from blipinpaint.source_pages import iter_inputs, list_group, shard_groups
from blipinpaint.source_reads import read_files
from blipinpaint.sources import ITEM_SCHEMA, SourceError, detect_kind, items_to_batch
from blipinpaint.storage import filesystem, write_text
from rayjobs.cli import job_main
from rayjobs.stream import ErrorWriter, commit_stage, counted_task, in_blocks_of, model_stages, run_stream

log = logging.getLogger("blipinpaint.generate")

MODEL_STAGES = {"captioner": builders.build_captioner, "inpainter": builders.build_inpainter,
                "metrics": builders.build_metrics}


def prepare(batch, cfg: Config, errors: ErrorWriter):
    """CPU task: read the file, decode, validate, resize, mask; unusable inputs leave here.

    Unusable rows are committed after the guarded part, never inside it: a retried batch
    must not commit them twice.
    """
    decode, mask = builders.build_decoder(cfg), builders.build_masker(cfg)
    read = functools.partial(read_files, max_mb=cfg.data.max_file_mb, image_column=cfg.data.image_column)
    out = Guarded("prepare", lambda b: mask(decode(read(b))), errors, cfg.stream.batch_retries)(batch)
    return split_errors(out, errors)


def no_more_remote_args() -> dict:
    """The read tasks' `ray_remote_args_fn`: nothing beyond their `num_cpus` (it only keeps Ray
    Data from fusing them into a model stage; `max_retries` there would print Ray 2.60's
    deprecation of `ray_remote_args` in every run's output)."""
    return {}


def list_pending(batch: dict[str, np.ndarray], source: str, committed) -> pa.Table:
    """Read task: the inputs of a shard group (`source_pages.list_group`), less the ids the
    log holds as committed (`committed`: `plan.committed_filter`), as the stages' columns."""
    items = [it for group in batch["group"] for it in list_group(json.loads(group), source)]
    done = set(committed([it["id"] for it in items]))
    return pa.Table.from_pydict(items_to_batch([it for it in items if it["id"] not in done]), schema=ITEM_SCHEMA)


def build_dataset(cfg: Config, pending: list[dict] | None, ledger, owner: str | None = None,
                  shards: tuple[str, list, set] | None = None) -> ray.data.Dataset:
    """The stream from `pending` inputs to committed rows; every write carries the run's `owner` token.

    With `shards` (source, shard groups, committed ids) instead of `pending`, the stream starts
    from the shard groups: read tasks list each group's members and drop its committed ids,
    so the driver holds shards, and the first rows reach the pools while the rest are listed."""
    stream, out_dir = cfg.stream, RunLayout(cfg.run_dir).generate
    errors = ErrorWriter(out_dir, owner)
    if shards is None:
        blocks = max(1, math.ceil(len(pending) / stream.read.batch_size))
        ds = ray.data.from_items(pending, override_num_blocks=blocks)
    else:
        source, groups, done = shards
        ds = ray.data.from_items([{"group": json.dumps(g)} for g in groups], override_num_blocks=len(groups))
        # One listing task at a time, taking no CPU share: Ray Data reserves each stage's share in
        # stream order, and at 10^6 inputs the listing never ends, so two listing tasks at
        # `read.num_cpus` held what the pools leave; `prepare` and the commits waited 21-28 s
        # for a slot while the inpainters idled (BENCHMARKS.md). A group's headers take well
        # under a second; its task lives on until the stream has taken its blocks.
        listing = ray.data.TaskPoolStrategy(size=1)
        ds = ds.map_batches(list_pending, fn_kwargs={"source": source, "committed": plan.committed_filter(done)},
                            batch_size=1, num_cpus=0, compute=listing)
        ds = in_blocks_of(ds, stream.read.batch_size, 0, listing)
    # The reads counted in the run's ledger: an input that kills its reader (a decoder crash,
    # the OOM killer) becomes error rows after `batch_retries` deaths, instead of a retry loop.
    # The reads never fuse into the captioner's actors: Ray Data fuses a task stage into an actor
    # stage of the same remote arguments (with both at 0.25 CPU a decoder crash took BLIP's actor
    # down with it), and never one that sets `ray_remote_args_fn` (`no_more_remote_args`).
    ds = ds.map_batches(counted_task, fn_kwargs={"name": "prepare", "run": functools.partial(prepare, cfg=cfg,
                                                                                             errors=errors),
                                                 "ledger": ledger, "retries": stream.batch_retries, "errors": errors,
                                                 "fault": stream.inject_failure},
                        batch_size=stream.read.batch_size, num_cpus=stream.read.num_cpus,
                        ray_remote_args_fn=no_more_remote_args)
    pools = {name: functools.partial(build, cfg) for name, build in MODEL_STAGES.items()}
    ds = model_stages(ds, pools, stream, errors, ledger)
    return commit_stage(ds, out_dir, SAMPLE_SCHEMA, builders.model_ids(cfg), stream.rows_per_file,
                        stream.commit.num_cpus, owner, ledger)


def metric_means(out_dir: str, account: Account, block: int = 1024) -> dict[str, float | None]:
    """The mean of each metric (finite values only: a perfect hole has infinite PSNR) over the
    samples `account` found (`ok_ids`), each read from the file of the part it found it in,
    `block` parts at a time and summed as they come: the driver never holds every row, and
    a block's rows are checked against that block's ids alone."""
    if not len(account.ok_ids):
        return {}
    fs, root = filesystem(out_dir)
    ok = pa.table({"part": account.ok_parts.cast(pa.string()), "id": account.ok_ids}).sort_by("part")
    parts = pc.value_counts(ok.column("part"))  # in the order first seen: sorted
    names, counts = parts.field("values").to_pylist(), parts.field("counts").to_pylist()
    sums, finite_rows, at = dict.fromkeys(METRIC_COLUMNS, 0.0), dict.fromkeys(METRIC_COLUMNS, 0), 0
    for start in range(0, len(names), block):
        n = sum(counts[start:start + block])
        table = pq.read_table([f"{root}/samples/{name}.parquet" for name in names[start:start + block]],
                              filesystem=fs, columns=["id", *METRIC_COLUMNS])
        table = table.filter(pc.is_in(table.column("id"), value_set=ok.column("id").slice(at, n)))
        at += n
        for m in METRIC_COLUMNS:
            values = table.column(m).to_numpy(zero_copy_only=False)
            finite = values[np.isfinite(values)]
            sums[m] += float(finite.sum(dtype=np.float64))
            finite_rows[m] += finite.size
    return {m: sums[m] / finite_rows[m] if finite_rows[m] else None for m in METRIC_COLUMNS}


def summarize(out_dir: str, account: Account, this_run: dict) -> dict:
    """The run's `stats.json`: every listed input accounted for, per-stage figures, metric means."""
    return {
        "out_dir": out_dir, "inputs": account.listed, "ok": account.ok_count, "errors": account.errors,
        "errors_by_reason": dict(sorted(account.errors_by_reason.items())),
        "missing": len(account.missing_ids), "duplicates": account.duplicates,
        "this_run": this_run,
        # Failed attempts (a stage raising, or its worker dying) on batches that were committed,
        # and why a stage ran a batch again (`Account.reruns_by_cause`).
        "retries": sum(account.retries.values()),
        "reruns": account.reruns_by_cause(),
        "stages": account.stages(),
        "means": metric_means(out_dir, account),
    }


def run(cfg: Config) -> dict:
    started = time.perf_counter()
    out_dir = RunLayout(cfg.run_dir).generate
    # 1. List the inputs first: a bad source fails before anything is written.
    source = cfg.data.source or str(sample_images_dir())
    listing = (source, cfg.data.kind, cfg.data.image_root, cfg.data.limit, cfg.seed, cfg.data.image_column,
               cfg.data.id_column)
    try:
        if cfg.dry_run:  # only say what a run would do: no model fetched, no actor, nothing but the plan written
            # Pages of a few shards at a time: the plan never holds the whole listing.
            return plan.plan(cfg, iter_inputs(*listing))
        # A WebDataset source is listed by the stream's read tasks, shard group by shard group
        # (`list_pending`); the driver holds the groups. The rest (and a `data.limit` subset,
        # chosen from the whole source) is listed here.
        kind = detect_kind(source) if cfg.data.kind == "auto" else cfg.data.kind
        groups = shard_groups(source) if kind == "webdataset" and cfg.data.limit is None else None
        items = None if groups else [it for page in iter_inputs(*listing) for it in page]
    except SourceError as err:
        raise ConfigError(str(err)) from None
    # 2. Models into the store before any actor loads one; refuse rows of other settings or
    #    models (or, with `restart`, move them aside).
    builders.fill_store(cfg)
    current = fingerprint.generate(cfg)
    fingerprint.claim(cfg, "generate", (out_dir,), current)
    write_text(out_dir.config, to_yaml(cfg))
    # 3. Resume: what a killed run left is finished or undone; the committed ids are skipped.
    commit_log = CommitLog(out_dir, compact_every=cfg.stream.compact_every)
    resumed = commit_log.resume(cfg.stream.retry_failed)
    pipeline_s, restarts = 0.0, {}
    if groups is None:
        pending = [it for it, undone in zip(items, resumed.undone([it["id"] for it in items])) if undone]
        log.info("%d inputs: %d already committed, %d to do", len(items), len(items) - len(pending), len(pending))
        # 4. Stream what is left.
        if pending:
            pipeline_s, restarts = run_stream(
                cfg, "generate", out_dir, len(items), len(items) - len(pending), len(pending),
                lambda cfg, ledger: build_dataset(cfg, pending, ledger, resumed.owner))
        inputs, processed = len(items), len(pending)
        account = commit_log.account([it["id"] for it in items])
    else:
        done = resumed.done_ids
        log.info("%d shards (%d groups) listed by the stream; %d ids already committed", sum(map(len, groups)),
                 len(groups), len(done))
        # 4. Stream it all: the read tasks skip the committed ids. How many rows are left is
        #    known once they are listed: no total for the progress line, no cap on the pools.
        #    A source with nothing left starts no pool (on a cluster: no GPU node brought up for
        #    nothing): the driver reads pages until one holds an id the log does not.
        listed = listed_if_done(source, groups, done)
        if listed is None:
            shards = (source, groups, done)
            pipeline_s, restarts = run_stream(cfg, "generate", out_dir, None, len(done), None,
                                              lambda cfg, ledger: build_dataset(cfg, None, ledger, resumed.owner,
                                                                                shards))
        else:
            log.info("every listed input is committed: nothing to stream")
        inputs, processed, account = account_pages(commit_log, source, done, listed)
    # 5. Account for every input.
    this_run = {
        "processed": processed, "skipped_committed": inputs - processed,
        "retried_failed": len(resumed.retried), **resumed.recovered,
        "pipeline_s": round(pipeline_s, 2), "wall_s": round(time.perf_counter() - started, 2),
        "images_per_s": round(processed / pipeline_s, 3) if pipeline_s else None,
        "restarts": restarts,  # of the pools' actors, by stage and cause
    }
    stats = {**summarize(out_dir, account, this_run), "fingerprint": current}
    commit_log.finish(stats, account, "inputs", success=json.dumps(current, indent=2))
    return stats


def listed_if_done(source: str, groups: list, done) -> plan.Listed | None:
    """None as soon as a shard group of a WebDataset source holds an id the log does not (the
    first group, on a new run), its groups listed one at a time; else, when `done` (the log's
    ids) holds every id, the source's listing checked against it (`plan.read_pages`): a run
    with nothing left lists its source once, not once to learn that and again to account."""
    index = plan.SortedIds.of(done)  # sorted once for both (1.7 s at 10^7 ids), freed on return
    committed, pending = plan.committed_filter(index), []

    def pages_while_done():
        for group in groups:
            items = list_group(group, source)
            if len(committed([it["id"] for it in items])) < len(items):
                pending.append(group)
                return
            yield items

    listed = plan.read_pages(index, pages_while_done(), keep_absent=True)
    return None if pending else listed


def account_pages(commit_log: CommitLog, source: str, done_before,
                  listed: plan.Listed | None = None) -> tuple[int, int, Account]:
    """(inputs, processed by this run, where each stands) of a streamed run: the source listed
    again in pages (`plan.read_pages`), each checked against the log, unless nothing was
    streamed (`listed`, `listed_if_done`'s); what is kept is the ids committed now and the ones
    that are not (none, after a whole run), as Arrow arrays."""
    if listed is None:
        listed = plan.read_pages(commit_log.committed_id_array(), iter_inputs(source, "webdataset"),
                                 keep_absent=True)
    account = replace(commit_log.account(listed.hits), listed=listed.inputs).with_missing(listed.absent)
    skipped = int(pc.sum(pc.is_in(listed.hits, value_set=done_before)).as_py() or 0)
    return listed.inputs, listed.inputs - skipped, account


def print_summary(stats: dict) -> None:
    if "plan" in stats:
        plan.print_plan(stats)
        return
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
