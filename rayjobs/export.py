"""Export a finished run's samples as a Hugging Face dataset folder and as WebDataset shards.

    python -m rayjobs.export [--config CONFIG.yaml] [dotted.key=value ...]

With the config the run was made with (its generate settings are checked against the
run's). On a cluster (the tunnel, the token, logs and stop: docs/cluster.md):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.export --config configs/paper-coco.yaml export.out=s3://BUCKET/coco-inpaint

Reads generate's committed rows (by its commit markers, never a listing) of a run whose
generate step finished under the fingerprint it holds, cuts them into shards per split
(`train`, and `heldout`: the run's evaluation set), and writes each shard as a Parquet file
of `hf/data/` and a tar of `webdataset/` in a Ray task, streaming a source part at a time.
Killed and run again, it writes only the shards that were not committed, byte for byte as
they would have been. Writes below `export.out` (default `run_dir/export`): `hf/` (a
dataset card `README.md`, `data/<split>-NNNNN-of-NNNNN.parquet`, `_manifest.json`),
`webdataset/` (the tars, `index.json`, `README.md`, `_manifest.json`), the export's commit
log (`samples/`: where each sample went), `fingerprint.json`, `stats.json`, `config.yaml`,
and `_SUCCESS` once every sample is exported once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import sys
import time
from collections import Counter

import numpy as np
import ray

from blipinpaint import fingerprint, recorded
from blipinpaint.commit_log import CommitLog
from blipinpaint.config import Config, dataset_name, heldout_fraction, sample_images_dir, to_yaml
from blipinpaint.export_card import card, front_matter, licence_files
from blipinpaint.export_formats import hf_schema
from blipinpaint.layout import Folder, RunLayout
from blipinpaint.reader import read_errors, split_reads
from blipinpaint.shards import FOLDERS, LEDGER_SCHEMA, ShardWriter, committed_shards, index, plan
from blipinpaint.storage import filesystem, manifest_bytes, write_text
from rayjobs.cli import job_main
from rayjobs.cluster import connect
from rayjobs.progress import CommitProgress
from rayjobs.stream import TASK_RETRIES, job_errors

log = logging.getLogger("blipinpaint.export")
SPLITS = ("train", "heldout")


def write_shards(batch: dict, writer: dict) -> dict:
    """CPU task: write and commit each shard of the batch (`ShardWriter(**writer)`)."""
    shard_writer = ShardWriter(**writer)
    done = [shard_writer(json.loads(s)) for s in batch["shard"]]
    return {"part": np.array([d["name"] for d in done], dtype=object),
            "rows": np.array([d["rows"] for d in done], dtype=np.int64)}


def stream(cfg: Config, out: str, pending: list[dict], writer: dict, total: int, done: int) -> float:
    """Write the `pending` shards, a Ray task each; the progress line counts committed samples."""
    connect(cfg.ray_address, cfg.ray_progress)
    started = time.perf_counter()
    ds = ray.data.from_items([{"shard": json.dumps(s)} for s in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(write_shards, fn_kwargs={"writer": writer}, batch_size=1, num_cpus=cfg.export.num_cpus,
                        max_retries=TASK_RETRIES)
    with job_errors(), CommitProgress("export", out, total, done, cfg.progress_s):
        ds.materialize()
    return time.perf_counter() - started


def _errors(generated_dir: str) -> dict:
    """Generate's error rows: how many, by kind, and the first few with their reasons."""
    by_reason = Counter(k for m in CommitLog(generated_dir).markers() for k in m["error_kinds"])
    rows, total = read_errors(generated_dir, limit=20)
    return {"total": total, "by_reason": dict(by_reason), "rows": rows}


def made_by_of(generated: dict, current: dict) -> dict:
    """What every exported file records of what made it: the digests of both fingerprints."""
    return {"generate_fingerprint": fingerprint.digest_of(generated),
            "export_fingerprint": fingerprint.digest_of(current)}


def publish(cfg: Config, out: Folder, generated: dict, current: dict) -> dict:
    """The folders' own files, made from the committed shards: the card, the shard index and a
    content manifest per folder (written last). Returns {split: {samples, shards}}."""
    shards = committed_shards(out)
    splits = {s: {"samples": sum(x["samples"] for x in shards if x["split"] == s),
                  "shards": sum(1 for x in shards if x["split"] == s)} for s in SPLITS}
    models: dict[str, Counter] = {}
    for shard in shards:
        for ids, n in shard["models"].items():
            for role, checkpoint in json.loads(ids).items():
                models.setdefault(role, Counter())[checkpoint] += n
    made_by = made_by_of(generated, current)
    licences = sum((s["licences"] for s in shards), Counter())
    text = card(dataset_name(cfg), generated, made_by["generate_fingerprint"], current, made_by["export_fingerprint"],
                splits, _errors(RunLayout(cfg.run_dir).generate), models, licences,
                licence_files(cfg.data.source or str(sample_images_dir())), cfg.export.formats)
    for fmt in cfg.export.formats:
        folder = FOLDERS[fmt][0].split("/")[0]
        # The YAML header is the Hub's, and maps the splits to the Parquet files.
        own = {"README.md": ((front_matter(dataset_name(cfg), splits) if fmt == "hf" else "") + text).encode()}
        if fmt == "webdataset":
            own["index.json"] = (json.dumps(index(shards, made_by), indent=1) + "\n").encode()
        for name, data in own.items():
            write_text(f"{out}/{folder}/{name}", data.decode())
        files = {posixpath.relpath(path, folder): record for s in shards for path, record in s["files"].items()
                 if path.startswith(FOLDERS[fmt][0])}
        files |= {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in own.items()}
        write_text(f"{out}/{folder}/_manifest.json", manifest_bytes(files).decode())
    return splits


def run(cfg: Config) -> dict:
    started = time.perf_counter()
    out = Folder((cfg.export.out or RunLayout(cfg.run_dir).export).rstrip("/"))
    # 1. Generate's rows: a finished run, under the fingerprint it holds, made with these settings.
    generated = recorded.finished_generate(cfg)
    # 2. The shards, from the commit markers: the run's train and held-out splits.
    train, heldout = split_reads(cfg)
    ids = sorted(i for r in (*train, *heldout) for i in r["ids"])
    shards = plan(dict(zip(SPLITS, (train, heldout))), cfg.export.rows_per_shard)
    # 3. The folder is this export's (or, with restart=[export], the old one is moved aside); resume.
    current = fingerprint.export(cfg, heldout_fraction(cfg, ids))
    fingerprint.claim(cfg, "export", (out,), current)
    write_text(out.config, to_yaml(cfg))
    commit_log = CommitLog(out, LEDGER_SCHEMA)
    resumed = commit_log.resume()
    pending = [s for s in shards if not resumed.done.issuperset(s["ids"])]
    log.info("%d samples in %d shards: %d shards already committed, %d to write", len(ids), len(shards),
             len(shards) - len(pending), len(pending))
    # 4. Write what is left.
    seconds = 0.0
    if pending:
        made_by = made_by_of(generated, current)
        writer = {"out": out, "formats": list(cfg.export.formats), "schema": hf_schema(made_by),
                  "generate_fingerprint": made_by["generate_fingerprint"], "owner": resumed.owner,
                  "kill": (cfg.export.inject_kill, os.getpid()) if cfg.export.inject_kill else None}
        seconds = stream(cfg, out, pending, writer, len(ids), len(resumed.done & set(ids)))
    # 5. Every sample once: the card, the index, the manifests; then `_SUCCESS`.
    account = commit_log.account(ids)
    splits = publish(cfg, out, generated, current) if account.complete else {}
    fs, root = filesystem(out)
    fs.delete_dir_contents(posixpath.join(root, "_staging", "shards"), missing_dir_ok=True)
    stats = {"out": out, "samples": len(ids), "shards": len(shards), "splits": splits,
             "formats": {f: f"{out}/{FOLDERS[f][0].split('/')[0]}" for f in cfg.export.formats},
             "this_run": {"shards_written": len(pending), "shards_skipped_committed": len(shards) - len(pending),
                          **resumed.recovered, "stream_s": round(seconds, 2),
                          "wall_s": round(time.perf_counter() - started, 2)},
             "fingerprint": current}
    commit_log.finish(stats, account, "samples", success=json.dumps(current, indent=2))
    return stats


def print_summary(stats: dict) -> None:
    run_ = stats["this_run"]
    splits = ", ".join(f"{name} {s['samples']}" for name, s in stats["splits"].items())
    print(f"\n{stats['samples']} samples ({splits}) in {stats['shards']} shards; this run wrote "
          f"{run_['shards_written']} (skipped {run_['shards_skipped_committed']} already committed) in "
          f"{run_['wall_s']} s")
    for fmt, folder in stats["formats"].items():
        print(f"{fmt}: {folder}")


def main(argv: list[str] | None = None) -> int:
    return job_main("export", __doc__, run, print_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
