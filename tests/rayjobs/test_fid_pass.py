"""The FID pass's stage, run in this process on a small committed part."""

import numpy as np
from helpers import encode, photo

from blipinpaint.config import load_config
from blipinpaint.evaluation import FID_SETS
from rayjobs.fid_pass import FidStage
from rayjobs.stream import attempt_ledger


def test_a_fid_actor_reads_its_part_and_runs_the_network_in_batches_of_the_configured_size(local_ray, cfg, tmp_path,
                                                                                            monkeypatch):
    """`evaluate.fid.batch_size` bounds a FID actor's memory: the network sees at most that
    many rows at a time, and every row of the part once, in id order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"s{i}", "mask_area": 0.2, **{c: encode(photo(64, 64, seed=i), "PNG") for c in FID_SETS.values()}}
            for i in (3, 0, 4, 1, 2)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part.parquet")
    cfg = load_config(overrides=[f"run_dir={cfg.run_dir}", "evaluate.fid.batch_size=2"])
    with attempt_ledger() as ledger:  # the run's ledger: counts the starts of each part
        stage = FidStage(cfg, FID_SETS, ledger)
        sizes, net = [], stage.features.net
        monkeypatch.setattr(stage.features, "net", lambda images: (sizes.append(len(images)), net(images))[1])
        out = stage({"path": [str(tmp_path / "part.parquet")], "ids": [["s0", "s1", "s2", "s3"]]})  # s4: not asked
    assert sizes == [2, 2] * len(FID_SETS)
    assert list(out["id"]) == ["s0", "s1", "s2", "s3"]
    assert {name: out[name].shape[0] for name in FID_SETS} == {name: 4 for name in FID_SETS}
    assert np.allclose(out["mask_area"], 0.2)
