"""The FID pass over evaluated rows: Ray actors fold Inception features into mergeable
statistics, and one task bootstraps the FID intervals from every row's features.

Shared Ray plumbing below the jobs (the evaluate job runs it); it imports no job.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from blipinpaint import builders
from blipinpaint.config import Config
from blipinpaint.evaluation import ALL, REAL, bucket_of, fid_scopes
from blipinpaint.fid import fid_table, merge_all
from blipinpaint.reader import row_reads
from rayjobs.stream import read_committed


@ray.remote
class FidWorker:
    """Folds the FID features of its shard into statistics per (image set, mask bucket);
    `sets` names each image set's PNG column (`evaluation.fid_sets`)."""

    def __init__(self, cfg: Config, sets: dict[str, str]):
        self.cfg = cfg
        self.fid = builders.build_fid(cfg, sets)

    def run(self, shard) -> dict:
        """{"stats": statistics per (image set, mask bucket), "ids" and "features": per row}."""
        for batch in shard.iter_batches(batch_size=self.cfg.evaluate.fid.batch_size, batch_format="numpy"):
            self.fid.update(batch, bucket_of(batch["mask_area"], list(self.cfg.evaluate.mask_buckets)))
        return {"stats": self.fid.stats, "ids": self.fid.ids, "features": self.fid.features}


@ray.remote
def bootstrap_fid(ids: list[str], features: list[dict[str, np.ndarray]], scopes: dict[str, list[str]],
                  cfg: Config) -> dict:
    """`evaluation.fid_scopes` on the rows of every FID worker, on the FID workers' device
    (`builders.fid_device`): each draw takes a covariance and an eigendecomposition per image set."""
    device = builders.fid_device(cfg)
    rows = {name: torch.as_tensor(np.concatenate([f[name] for f in features]), dtype=torch.float64, device=device)
            for name in features[0]}
    bootstrap = cfg.evaluate.bootstrap
    return fid_scopes(ids, rows, scopes, bootstrap.fid_replicates, cfg.seed, bootstrap.confidence)


def compute_fid(cfg: Config, eval_dir: str, sets: dict[str, str], ids: list[str],
                changed: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """FID of each image set of `sets` against the ground truth, on the rows `ids` committed
    in `eval_dir`, overall and per mask bucket; and the bootstrap intervals of the FIDs and
    of their differences, on all samples and on the `changed` ones (`bootstrap_fid`)."""
    stage = cfg.evaluate.fid
    n = stage.size if stage.size is not None else stage.max_size
    ds = read_committed(row_reads(eval_dir, ids), ["id", "mask_area", *sets.values()], cfg.stream.read.num_cpus)
    shards = ds.streaming_split(n)
    workers = [FidWorker.options(num_cpus=stage.num_cpus, num_gpus=stage.num_gpus or None).remote(cfg, sets)
               for _ in range(n)]
    pending = [w.run.remote(s) for w, s in zip(workers, shards)]
    merged, ids_seen, features = {}, [], []
    while pending:  # merge as workers finish: one worker's statistics in memory at a time
        done, pending = ray.wait(pending)
        part = ray.get(done[0])
        merged = merge_all([merged, part["stats"]])
        ids_seen += part["ids"]
        features.append(part["features"])
    features = [f for f in features if f]  # a worker whose shard came out empty
    intervals = bootstrap_fid.options(num_cpus=stage.num_cpus, num_gpus=stage.num_gpus or None).remote(
        ids_seen, features, {ALL: ids, "changed": changed}, cfg)
    return fid_table(merged, real=REAL), ray.get(intervals)
