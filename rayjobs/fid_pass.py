"""The FID pass over evaluated rows: a pool of FID actors turns each committed part into its
rows' Inception features, the driver folds them into statistics, and one task bootstraps
the FID intervals from every row's features.

It survives the loss of a worker or a whole node by itself. Each unit of work is one
committed part, read again by whichever actor takes it: the pool's actors restart, a part
whose actor died runs again elsewhere (Ray Data's retries), and the features of a part
depend on its ids alone (`fid.FidFeatures`), so a part done twice gives the same numbers
as once. The driver keys features by id and folds them in id order: the figures of a run
that lost a node are those of a run that did not. The bootstrap task is retried too.
Where Ray gives up (retries spent), the job stops with one line; the evaluated rows are
committed, and the same command redoes only this pass and the report.

Shared Ray plumbing below the jobs (the evaluate job runs it); it imports no job.
"""

from __future__ import annotations

import logging

import numpy as np
import ray
import torch

from blipinpaint import builders
from blipinpaint.config import Config
from blipinpaint.errors import JobError
from blipinpaint.evaluation import ALL, REAL, bucket_of, fid_scopes
from blipinpaint.fid import fid_table, fold
from blipinpaint.reader import read_rows, row_reads
from rayjobs.stream import JOB_ERRORS, TASK_RETRIES, attempt_ledger, hold, job_errors, maybe_die, trace

log = logging.getLogger(__name__)


class PartFailed(JobError):
    """A part on which the FID workers died again and again (not a node lost under them)."""


class FidStage:
    """One actor of the FID pool: builds the feature network once, then takes committed parts
    (read tasks, `reader.row_reads`) and returns their rows' features (`fid.FidFeatures`)."""

    def __init__(self, cfg: Config, sets: dict[str, str], ledger):
        trace("fid init")
        self.features = builders.build_fid(cfg, sets)
        trace("fid built")
        self.columns = ["id", "mask_area", *sets.values()]
        self.fault, self.ledger = cfg.stream.inject_failure, ledger

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        key = "fid-" + ",".join(str(p) for p in batch["path"])
        started = ray.get(self.ledger.start.remote(key))
        if started > TASK_RETRIES + 1:  # deaths, not a lost node's refused calls: those never start it
            raise PartFailed(f"the FID workers died on {key[4:]} {started - 1} times; the evaluated rows are "
                             "committed: read the workers' logs (`ray logs`), then the same command again redoes "
                             "only the FID pass and the report")
        ids = [i for ids in batch["ids"] for i in ids]
        maybe_die(self.fault, "fid", ids, started)  # tests: a crash on this part (`stream.inject_failure.exit`)
        hold(self.fault, "fid", ids)
        # The actor reads its part itself (not a read task before it): Ray Data may split or
        # merge blocks on the way, and the chunks the network sees must not depend on that.
        out = self.features(read_rows(batch, self.columns))
        self.ledger.done.remote(key)
        return out


@ray.remote(max_retries=TASK_RETRIES)
def bootstrap_fid(ids: list[str], features: dict[str, np.ndarray], scopes: dict[str, list[str]], cfg: Config) -> dict:
    """`evaluation.fid_scopes` on every row's features (`ids` names the rows), on
    the FID workers' device (`builders.fid_device`): each draw takes a covariance and an
    eigendecomposition per image set. Retried where its worker or node dies (its inputs are the driver's)."""
    device = builders.fid_device(cfg)
    # A copy in float64: the features arrive read-only from the object store.
    rows = {name: torch.from_numpy(np.array(x, dtype=np.float64)).to(device) for name, x in features.items()}
    bootstrap = cfg.evaluate.bootstrap
    return fid_scopes(ids, rows, scopes, bootstrap.fid_replicates, cfg.seed, bootstrap.confidence)


def pool_size(cfg: Config) -> int:
    stage = cfg.evaluate.fid
    return stage.size if stage.size is not None else stage.max_size


def row_features(cfg: Config, eval_dir: str, sets: dict[str, str],
                 ids: list[str]) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """The FID features of the committed rows `ids` in `eval_dir`, from a restartable pool of
    `evaluate.fid.size` actors: (ids sorted, their mask areas, features per set in that order)."""
    stage = cfg.evaluate.fid
    reads = row_reads(eval_dir, ids)
    ds = ray.data.from_items(reads, override_num_blocks=max(len(reads), 1))
    found: dict[str, tuple[float, dict[str, np.ndarray]]] = {}
    with attempt_ledger() as ledger:
        # The pool comes back after a lost node: its actors start again where there is room
        # (max_restarts=-1), and a part whose actor died is sent again until one takes it
        # (max_task_retries=-1: calls to an actor on a node not yet declared dead fail at
        # once, several times a second). The ledger bounds the deaths a part may cause.
        actors = max(1, min(pool_size(cfg), len(reads)))  # no more actors than parts
        ds = ds.map_batches(FidStage, fn_constructor_kwargs={"cfg": cfg, "sets": sets, "ledger": ledger},
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=stage.num_cpus, num_gpus=stage.num_gpus or None, max_restarts=-1,
                            max_task_retries=-1)
        with job_errors((*JOB_ERRORS, PartFailed)):
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for k, i in enumerate(batch["id"]):  # by id: a part delivered twice counts once
                    found[str(i)] = (float(batch["mask_area"][k]), {name: batch[name][k] for name in sets})
    missing = sorted(set(ids) - set(found))
    if missing:
        raise JobError(f"the FID pass got no features for {len(missing)} of {len(ids)} evaluated rows in {eval_dir} "
                       f"(first: {missing[0]}); run the same command again")
    order = sorted(ids)
    areas = np.array([found[i][0] for i in order], dtype=np.float64)
    features = {name: np.stack([found[i][1][name] for i in order]) for name in sets}
    return order, areas, features


def compute_fid(cfg: Config, eval_dir: str, sets: dict[str, str], ids: list[str],
                changed: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """FID of each image set of `sets` against the ground truth, on the rows `ids` committed
    in `eval_dir`, overall and per mask bucket; and the bootstrap intervals of the FIDs and
    of their differences, on all samples and on the `changed` ones (`bootstrap_fid`)."""
    stage = cfg.evaluate.fid
    try:
        order, areas, features = row_features(cfg, eval_dir, sets, ids)
        stats = fold(features, bucket_of(areas, list(cfg.evaluate.mask_buckets)))
        intervals = bootstrap_fid.options(num_cpus=stage.num_cpus, num_gpus=stage.num_gpus or None).remote(
            order, ray.put(features), {ALL: ids, "changed": changed}, cfg)
        return fid_table(stats, real=REAL), ray.get(intervals)
    except ray.exceptions.RayError as err:  # retries spent: one line, not Ray's traceback
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise JobError(f"the FID pass failed ({type(err).__name__}: {first.strip()[:300]}); the evaluated rows in "
                       f"{eval_dir} are committed: the same command again redoes only the FID pass and the "
                       "report") from None
