"""The FID workers and the bootstrap task use the GPU they are asked for, or stop: no silent CPU."""

import numpy as np
import pytest
import torch

from blipinpaint import builders
from blipinpaint.config import load_config
from rayjobs.fid_pass import FidStage, bootstrap_fid

ASKS_FOR_CUDA = [["evaluate.fid.num_gpus=0.25"], ["models.device=cuda"]]


@pytest.fixture
def no_cuda(monkeypatch):
    """A worker without CUDA, on any machine (this one has none; a GPU machine too)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("asks", ASKS_FOR_CUDA)
def test_fid_asked_for_cuda_where_there_is_none_is_an_error(cfg, no_cuda, asks):
    cfg = load_config(overrides=[f"run_dir={cfg.run_dir}", *asks])
    features = {"real": np.ones((3, 4), np.float32), "fake": np.zeros((3, 4), np.float32)}
    with pytest.raises(RuntimeError, match="ask for CUDA for FID, but this worker has no CUDA device"):
        bootstrap_fid._function(["a", "b", "c"], features, {"all": ["a", "b", "c"]}, cfg)
    with pytest.raises(RuntimeError, match="ask for CUDA for FID"):
        FidStage(cfg, {"real": "image_png"}, ledger=None)  # the pool's actor, built in this process


def test_fid_runs_on_the_cpu_when_no_gpu_is_asked_for(cfg, no_cuda):
    assert builders.fid_device(cfg) == torch.device("cpu")
