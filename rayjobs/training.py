"""Ray Train + DeepSpeed plumbing shared by the training jobs.

Every rank saves its DeepSpeed checkpoint shard and reports it; a restarted worker group
(after a failure, or a rerun of the same command after the driver died) resumes from the
latest reported checkpoint, because the run's name and storage are fixed by `run_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings

import ray
import ray.train
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchConfig, TorchTrainer

from blipinpaint.commit_log import CommitLog
from blipinpaint.config import Config
from blipinpaint.errors import JobError
from blipinpaint.models.loading import DTYPES

log = logging.getLogger(__name__)
# DeepSpeed's ZeRO calls a torch collective that torch deprecates: a warning from every rank
# of every run that says nothing about this project.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)


# Ray Train's controller polls its workers every 2 s by default, and collects one report per
# poll: a worker whose previous report is not collected yet waits in its next one. A job that
# reports 5 checkpoints in 2 s of training then waits ~8 s for them, and every run waits up to
# a poll more for the controller to see its workers finish (BENCHMARKS.md, "Where a training
# job's seconds go"). A poll is a small remote call per worker; a worker that misses one is
# polled again, and declared dead only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min).
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
CONTROLLER_POLL_S = 0.2


@contextlib.contextmanager
def controller_poll(seconds: float = CONTROLLER_POLL_S):
    """Inside: a Ray Train controller started from this process polls its workers every
    `seconds` (unless the user set `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`). Ray Train reads the
    variable in the driver when `fit` starts the controller and passes it to the controller
    and its workers; it is put back as it was after."""
    if POLL_ENV in os.environ:
        yield
        return
    os.environ[POLL_ENV] = str(seconds)
    try:
        yield
    finally:
        os.environ.pop(POLL_ENV, None)


def per_worker(cfg: Config, batch_size: int) -> int:
    """Each worker's share of a global batch (`scorer.batch_size`, `finetune.batch_size`: the
    samples per optimizer step over all workers, as the paper counts them; the config check
    makes it a multiple of `train.num_workers`)."""
    return batch_size // cfg.train.num_workers


def deepspeed_config(cfg: Config, batch_size: int, dtype: str | None = None) -> dict:
    """DeepSpeed settings for the global `batch_size`; the engine trains in `dtype` (default
    `models.dtype`), on GPU or CPU alike."""
    dtype = dtype or cfg.models.dtype
    zero = {"stage": cfg.train.zero_stage}
    if cfg.train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        # DeepSpeed checks global = per worker x accumulation x workers when it starts. No
        # accumulation: the paper's batch of 8 on 8 workers is one sample each.
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": per_worker(cfg, batch_size),
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        # A plain torch Adam: DeepSpeed's fused/CPU Adam would compile C++ on first use. With
        # the optimizer state offloaded, torch's Adam steps the fp32 masters on the CPU.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # The engine casts the module to this dtype and keeps fp32 master weights in the optimizer.
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 10**9,
    }


def engine_settings(engine) -> dict:
    """What the DeepSpeed engine actually runs with, for the job's report."""
    return {"zero_stage": int(engine.zero_optimization_stage()), "offload_optimizer": bool(engine.zero_cpu_offload()),
            "dtype": str(next(engine.module.parameters()).dtype).removeprefix("torch."),
            "workers": dist.get_world_size(), "global_batch": engine.train_batch_size(),
            "batch_per_worker": engine.train_micro_batch_size_per_gpu(),
            "cpus_per_worker": ray.get_runtime_context().get_assigned_resources().get("CPU"),
            # The interval the controller polled this worker at (passed down by it).
            "controller_poll_s": float(os.environ[POLL_ENV]) if POLL_ENV in os.environ else None}


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


def gather_fp32_masters(engine) -> dict[str, torch.Tensor]:
    """The fp32 master weights of the engine's module, gathered from every rank's partition (a
    collective: every rank calls it; rank 0 gets them on the CPU, the others {}). Its
    half-precision copy would drop each update below half an ulp."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if dist.get_rank() == 0:
            weights[name] = full.detach().cpu()
    return weights


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors, their bytes in their own dtype."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return hasher.hexdigest()


def checksum(module: torch.nn.Module, skip: str | None = None) -> str:
    """A digest of the module's weights (without those whose names start with `skip`): what a
    training job records of the parts it must leave unchanged, and of what it trained."""
    return digest({name: tensor for name, tensor in module.state_dict().items()
                   if skip is None or not name.startswith(skip)})


def module_digest(engine) -> str | None:
    """A digest of the weights the engine's module computes with (in half precision, its
    copy of the fp32 masters), gathered under ZeRO-3: a collective, every rank calls it;
    rank 0 gets the digest, the others None."""
    import deepspeed

    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=engine.zero_optimization_stage() == 3):
        return digest(dict(named)) if dist.get_rank() == 0 else None


def loss_scaling(engine) -> dict:
    """The optimizer steps DeepSpeed skipped so far and its loss scale now.

    A step is skipped when a gradient holds an inf or a NaN: in fp16 an overflow, after which
    the dynamic loss scale halves; in bf16 and fp32 no loss scaling runs (`loss_scale` None,
    not an invented 1) but such a step is dropped all the same. DeepSpeed counts skipped steps
    in `global_steps` too, and restores both from a checkpoint."""
    optimizer = engine.optimizer
    dynamic = bool(getattr(optimizer, "dynamic_loss_scale", False))
    return {"skipped_steps": int(engine.skipped_steps),
            "loss_scale": float(optimizer.loss_scale) if dynamic else None}


def check_trained(job: str, steps: int, skipped: int, loss_scale: float | None, log_uri: str) -> None:
    """End `job` with one line when DeepSpeed skipped every one of its `steps` optimizer steps:
    nothing was trained, and the output must not pass for a trained model (some skipped: a
    warning)."""
    if steps > 0 and skipped >= steps:
        scale = f"; the fp16 loss scale fell to {loss_scale:g}" if loss_scale is not None else ""
        raise JobError(f"DeepSpeed skipped all {steps} optimizer steps (an inf or NaN gradient at every "
                       f"step{scale}): nothing was trained, the output is not marked done; each epoch's "
                       f"skipped_steps and loss_scale are in {log_uri}")
    if skipped:
        log.warning("%s: DeepSpeed skipped %d of %d optimizer steps (an inf or NaN gradient)", job, skipped, steps)


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """`deepspeed.initialize` on a rank whose process group Ray Train has set up: the engine.

    On a CPU worker DeepSpeed would first JIT-compile its shared-memory all-reduce, a C++
    build of about a minute (into ~/.cache/torch_extensions, on every fresh machine or home,
    with a compiler needed on every worker), though only its inference all-reduce uses it.
    """
    import deepspeed  # imported on the worker: it picks the accelerator of that machine
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Ray Train logs every report of every rank at INFO under a logger named by its file's path,
    # which `LoggingConfig(log_level=...)` (set in `make_trainer`) misses. Silenced here: each
    # report's figures are in the job's `metrics.jsonl` already.
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False, config=ds_config)
    return engine


def make_trainer(loop, loop_config: dict, cfg: Config, name: str, storage: str,
                 datasets: dict | None = None) -> TorchTrainer:
    train = cfg.train
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=os.path.abspath(storage) if "://" not in storage else storage,
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # Ray Train's own INFO lines (worker groups, every checkpoint and
                             # report, from every rank) stay in its log files: a job's log holds
                             # rank 0's progress lines (`rayjobs.progress`) and the warnings.
                             logging_config=LoggingConfig(log_level="WARNING")),
        datasets=datasets,
    )


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


def owner_log(fence: tuple[str, str]) -> CommitLog:
    """The output folder of `fence` (the folder and the run's token from `CommitLog.take_over`)."""
    return CommitLog(fence[0], owner=fence[1])


def still_owner(fence: tuple[str, str]) -> bool:
    """Whether this run still owns its output folder (`fence`: the folder and the run's token
    from `CommitLog.take_over`), rank 0's answer on every rank: a collective, so that no
    rank stops while another waits for it in the next one.

    A killed driver's ranks may outlive it; once the same command runs again, they stop
    before they write a log line, a checkpoint or the model into the new run's files.
    """
    # Rank 0 reads (one storage request per step, not one per rank) and tells the others;
    # on the training device, as NCCL moves CUDA tensors only.
    owned = dist.get_rank() != 0 or owner_log(fence).owns()
    stop = torch.tensor([0.0 if owned else 1.0], device=ray.train.torch.get_device())
    dist.broadcast(stop, src=0)
    if stop.item():
        log.warning("%s was taken over by another run: this run's ranks stop", fence[0])
    return not stop.item()


def fit(trainer, cfg: Config, fence: tuple[str, str]):
    """Run `trainer`; one line when it fails for good, Superseded when another run took over."""
    try:
        with controller_poll():
            result = trainer.fit()
    except TrainingFailedError as err:
        failures = getattr(err, "worker_failures", None) or {}
        rank = min(failures) if failures else None
        cause = failures.get(rank, err)
        where = f"rank {rank}" if rank is not None else "the controller"
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        raise JobError(f"training failed (train.max_failures={cfg.train.max_failures} restarts allowed); "
                       f"the error on {where}: {type(cause).__name__}: {(lines[-1] if lines else '')[:300]}"
                       " (the workers' logs: `ray logs` or the dashboard)") from None
    owner_log(fence).check_owner()  # the ranks stopped early: this run's outputs are not its own
    return result


_last_reported: dict = {}  # this process's last checkpointed metrics (fault injection waits for them)


def save_and_report(engine, metrics: dict, client_state: dict) -> None:
    """Every rank writes its checkpoint shard and reports it with the same metrics."""
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag="checkpoint", client_state=client_state)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
    _last_reported.update(metrics=_checkpoint_key(metrics))


def _checkpoint_key(metrics: dict) -> dict:
    # Epoch and step name a checkpoint; a NaN loss never equals itself (and the snapshot stores it as null).
    return {k: metrics.get(k) for k in ("epoch", "step")}


def _registered_checkpoint_metrics() -> dict | None:
    """The metrics of the latest checkpoint the Ray Train controller has registered, read
    from the snapshot it writes to the run's storage on every registration."""
    storage = ray.train.get_context().get_storage()  # a DeveloperAPI: fault injection only
    try:
        with storage.storage_filesystem.open_input_stream(storage.checkpoint_manager_snapshot_path) as f:
            latest = json.loads(f.read()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return None
    return latest and _checkpoint_key(latest["metrics"])


def maybe_fail(cfg: Config, step: int, resumed: bool, timeout_s: float = 300.0) -> None:
    """Fault injection for tests: rank 0's process dies at the configured step, first attempt only.

    It first waits until the controller has registered this worker's last checkpoint: a
    report is collected at the controller's next poll, and a death before that would lose
    the checkpoint and restart from scratch.
    """
    if (cfg.train.inject_failure_at_step != step or resumed
            or ray.train.get_context().get_world_rank() != 0):
        return
    deadline = time.monotonic() + timeout_s
    while _last_reported and _registered_checkpoint_metrics() != _last_reported["metrics"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the checkpoint of {_last_reported['metrics']} was not registered in {timeout_s} s")
        time.sleep(0.1)
    os._exit(1)
