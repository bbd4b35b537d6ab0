"""The FID pass's actors, run in this process on a small dataset of the session's Ray."""

import ray
from helpers import encode, photo

from blipinpaint.config import load_config
from blipinpaint.evaluation import FID_SETS
from rayjobs.fid_pass import FidWorker


def test_fid_workers_fold_their_shard_in_batches_of_the_configured_size(local_ray, cfg, monkeypatch):
    """`evaluate.fid.batch_size` bounds a FID worker's memory: each batch it folds holds at most
    that many rows, and every row is folded once."""
    rows = [{"id": f"s{i}", "mask_area": 0.2, **{c: encode(photo(64, 64, seed=i), "PNG") for c in FID_SETS.values()}}
            for i in range(5)]
    cfg = load_config(overrides=[f"run_dir={cfg.run_dir}", "evaluate.fid.batch_size=2"])
    worker = FidWorker.__ray_actor_class__(cfg, FID_SETS)  # the actor's class, run in this process
    sizes, update = [], worker.fid.update
    monkeypatch.setattr(worker.fid, "update", lambda batch, groups: (sizes.append(len(groups)), update(batch, groups)))
    out = worker.run(ray.data.from_items(rows))
    assert sorted(sizes, reverse=True) == [2, 2, 1]
    assert {count for count in (s.count for s in out["stats"].values())} == {5}
    # Each row's features too, for the FID intervals: a row per id, in the same order in every set.
    assert sorted(out["ids"]) == [f"s{i}" for i in range(5)]
    assert {name: len(f) for name, f in out["features"].items()} == {name: 5 for name in FID_SETS}
