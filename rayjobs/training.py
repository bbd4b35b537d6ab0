"""Ray Train + DeepSpeed plumbing shared by the training jobs.

Every rank saves its DeepSpeed checkpoint shard and reports it; a restarted worker group
(after a failure, or a rerun of the same command after the driver died) resumes from the
latest reported checkpoint, because the run's name and storage are fixed by `run_dir`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import ray
import ray.train
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from blipinpaint.config import Config, ConfigError, heldout_fraction
from blipinpaint.models.loading import DTYPES
from blipinpaint.seeds import heldout
from rayjobs.common import generated_ids

log = logging.getLogger(__name__)

CONTROLLER_POLL_S = 2.0  # Ray Train's default RAY_TRAIN_HEALTH_CHECK_INTERVAL_S


def deepspeed_config(cfg: Config, batch_size: int, dtype: str | None = None) -> dict:
    """DeepSpeed settings; the engine trains in `dtype` (default `models.dtype`), on GPU or CPU alike."""
    dtype = dtype or cfg.models.dtype
    zero = {"stage": cfg.train.zero_stage}
    if cfg.train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        # A plain torch Adam: DeepSpeed's fused/CPU Adam would compile C++ on first use.
        "zero_allow_untested_optimizer": True,
        # The engine casts the module to this dtype and keeps fp32 master weights in the optimizer.
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 10**9,
    }


def half_dtype(cfg: Config) -> torch.dtype | None:
    """The half precision DeepSpeed trains in for `models.dtype`, or None for fp32."""
    return None if cfg.models.dtype == "fp32" else DTYPES[cfg.models.dtype]


def set_fp32_masters(engine, weights: dict[str, torch.Tensor]) -> None:
    """Give DeepSpeed's fp32 master copy of each trained parameter these fp32 values.

    A half-precision engine copies its masters from the module after casting it, so they
    start rounded to half precision. Under ZeRO-3 each rank sets its own partition: the
    full setter reads past the end of a parameter whose size does not split evenly.
    """
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        if not hasattr(param, "ds_id"):  # ZeRO-1/2
            safe_set_full_fp32_param(param, weights[name])
            continue
        local = safe_get_local_fp32_param(param)
        start = dist.get_rank() * local.numel()  # one data-parallel group: the partition's index is the rank
        part = weights[name].flatten()[start:start + local.numel()]
        padded = torch.zeros_like(local)  # the last rank's partition is padded
        padded[:part.numel()] = part.to(local)
        safe_set_local_fp32_param(param, padded)


def make_trainer(loop, loop_config: dict, cfg: Config, name: str, storage: str, datasets: dict) -> TorchTrainer:
    t = cfg.train
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=os.path.abspath(storage) if "://" not in storage else storage,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
    )


def split(ds: ray.data.Dataset, cfg: Config) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(train, held-out) by a hash of each id: the same split in every job and rerun."""
    ids, seed = generated_ids(cfg), cfg.seed
    fraction = heldout_fraction(cfg, ids)
    held = sum(heldout(seed, i, fraction) for i in ids)
    if held == len(ids):
        raise ConfigError(f"{len(ids)} generated samples, {held} of them held out (train.val_fraction, raised to "
                          f"{fraction:.3g} so that 2 are held out where 4 or more exist): none left to train on")
    log.info("split: %d samples to train on, %d held out (fraction %.3g)", len(ids) - held, held, fraction)
    return (ds.filter(lambda row: not heldout(seed, row["id"], fraction)),
            ds.filter(lambda row: heldout(seed, row["id"], fraction)))


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with `torch.load(weights_only=True)`.

    DeepSpeed unpickles its checkpoints without restriction, so a checkpoint altered in a
    shared `run_dir` could run code in every worker that resumes from it. Its files hold
    tensors, containers and these DeepSpeed types, nothing else (fp16 training keeps its
    live `DynamicLossScaler` in the optimizer state; bf16 and fp32 a static `LossScaler`).
    """

    SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(self.SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


def restore(engine) -> dict | None:
    """Load the latest reported checkpoint into `engine`; its client state, or None."""
    safe = WeightsOnlyCheckpointEngine()
    safe.zipfile_serialization = engine.checkpoint_engine.zipfile_serialization  # saving stays as configured
    engine.checkpoint_engine = safe
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        _, client_state = engine.load_checkpoint(directory)
    return client_state


def save_and_report(engine, metrics: dict, client_state: dict) -> None:
    """Every rank writes its checkpoint shard and reports it with the same metrics."""
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag="checkpoint", client_state=client_state)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))


def maybe_fail(cfg: Config, step: int, resumed: bool) -> None:
    """Fault injection for tests: rank 0's process dies at the configured step, first attempt only.

    It first waits out one Ray Train controller poll: a checkpoint is registered when the
    controller collects its report, and a death milliseconds after a report (which only
    fast tests produce) would lose it and restart from scratch.
    """
    if (cfg.train.inject_failure_at_step == step and not resumed
            and ray.train.get_context().get_world_rank() == 0):
        time.sleep(2 * CONTROLLER_POLL_S)
        os._exit(1)
