"""Connecting to Ray, and the actor pools of the streaming jobs sized from the config and the cluster."""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
import sys
import threading
import time
import warnings

import ray
from ray._private import ray_constants
from ray.data import ActorPoolStrategy, DataContext
from ray.util.annotations import RayDeprecationWarning

from blipinpaint.config import AUTO, Config, StageConfig, StreamConfig

log = logging.getLogger(__name__)

# Ray Data's cluster autoscaler, set here unless the user set it. Ray 2.60's default
# (RATE_BASED) limits an execution to the resources its operators asked for plus the whole
# CPUs left over: its coordinator splits the rest with integer division, so with the pools
# at fractional CPUs a quarter to three quarters of a core went unused (Ray Data's log:
# `Active & requested resources: 1.5/1.5 CPU` on 2 cores), and the commit stage, last in
# Ray Data's reservation order, got no share until an earlier stage ended: parts came in
# bursts, after minutes (BENCHMARKS.md, a real run at 10^6). `V2` limits an execution to what
# the cluster holds, and still asks an autoscaling cluster for nodes when it is busy.
DATA_AUTOSCALER_ENV, DATA_AUTOSCALER = "RAY_DATA_CLUSTER_AUTOSCALER", "V2"

# A driver joined to a cluster whose GCS (on the head node) is gone cannot go on: Ray keeps
# it waiting `gcs_rpc_server_reconnect_timeout_s` (60 s by default), printing a line a second
# ("Failed to push error to driver"), then ends it from C++ with its own fatal line. The
# watchdog ends the job first, after this long without a GCS, with one line saying what to
# do. Below Ray's 60 s, and far above the seconds a GCS restarted under GCS fault tolerance
# (Redis) takes to come back.
HEAD_LOST_AFTER_S = 20.0
# The name the watchdog's line starts with (`rayjobs.cli.job_main` sets it).
job_name = "job"


def connect(address: str | None = None, ray_progress: bool = False) -> None:
    """Join the Ray cluster of `address` / $RAY_ADDRESS, or start a local one on loopback.

    `ray job submit` sets $RAY_ADDRESS for the job's driver. A local Ray binds to
    127.0.0.1 only (never the machine's external interface) and keeps Ray's token
    authentication on. Ray Data's progress bars are drawn only with `ray_progress`: the
    jobs print their own (`rayjobs.progress`), where Ray Data's would be a line per redraw
    in a job's log.
    """
    os.environ.setdefault(DATA_AUTOSCALER_ENV, DATA_AUTOSCALER)  # read by each execution, in its process
    # Ray 2.60 deprecates `ray_remote_args` and `ray_remote_args_fn` for named parameters that
    # do not yet cover what the jobs pass through them (max_retries, max_restarts,
    # max_task_retries, and the reads' unfusing `ray_remote_args_fn`): the warning would print
    # once per stage in every job's log, with nothing a user could do. Re-check on a Ray upgrade.
    warnings.filterwarnings("ignore", message=r"`ray_remote_args(_fn)?` is deprecated", category=RayDeprecationWarning)
    context = DataContext.get_current()  # carried to the processes that run this job's executions
    context.enable_progress_bars = context.print_on_execution_start = ray_progress
    if not ray_progress:
        # Each execution's start, plan and end stay in Ray Data's log file (`ray-data.log`),
        # and so does its hint that the bars are off (they are off on purpose).
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        watch_head(ray.get_runtime_context().gcs_address)
        return
    # Ray binds a new local cluster to the machine's external interface unless this flag is
    # off. Ray reads it once, at import, so the flag is also switched in this process; the
    # GCS, raylet and workers that ray.init starts read the variable.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # The GCS and raylet, and through the raylet every worker, inherit this process's
    # environment: the workers build and find models where the driver does (BLIPINPAINT_CACHE,
    # HF_HOME, the offline flags), and Ray Data's executions in them scale as the driver's.
    # No runtime env: Ray starts each worker of a job that has one through its setup script,
    # a second Python start (0.28 s of CPU a worker on 2 cores). Ray Train still gives its
    # controller and workers a runtime env of its own.
    # The dashboard (on loopback) serves the state API, which Ray Train's placement-group
    # cleaner polls: without it, the cleaner warns every few seconds of every training run.
    # address="local": with no address Ray joins the cluster named in
    # /tmp/ray/ray_current_cluster (whoever started it last on this machine), not a new one.
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
    log.info("started a local Ray: %s", ray.cluster_resources())


def watch_head(gcs_address: str, lost_after_s: float = HEAD_LOST_AFTER_S, every_s: float = 1.0) -> None:
    """End this driver with one line, exit code 1, once the GCS at `gcs_address` has refused
    connections for `lost_after_s` (the head node lost: Ray cannot recover it, the same
    command on a new cluster completes the job from the run's folder). A daemon thread; it
    stops with `ray.shutdown`."""
    host, port = gcs_address.rsplit(":", 1)

    def reachable() -> bool:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, every_s * 2)):
                return True
        except OSError:
            return False

    def watch() -> None:
        lost_since = None
        while ray.is_initialized():
            if reachable():
                lost_since = None
            else:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since >= lost_after_s:
                    print(f"{job_name}: lost the Ray cluster's head (its GCS at {gcs_address} unreachable for "
                          f"{lost_after_s:g} s); what was committed is kept in the run's folder: run the same "
                          "command again on a running cluster to finish the job", file=sys.stderr, flush=True)
                    os._exit(1)  # not sys.exit: this is a thread, and Ray's shutdown would wait for the GCS
            time.sleep(every_s)

    threading.Thread(target=watch, name="blipinpaint-head-watch", daemon=True).start()


MODEL_STAGES = ("captioner", "inpainter", "metrics")


def auto_sizes(stream: StreamConfig, now: dict[str, float], most: dict[str, float] | None,
               rows: int | None = None) -> StreamConfig:
    """`stream` with each `size: auto` model stage sized from the cluster's resources: `now`, what
    it has, and `most`, what an autoscaling cluster may grow to (None: it does not scale).
    With `rows` to do, no more inpainters than the batches they arrive in (the read tasks'
    or the inpainter's, whichever is larger): an actor with nothing to do only costs a start.

    BLIP and CLIP get one actor each; the inpainter, nearly all the work, gets what they and
    the read and commit tasks (one of each at a time at least: `read.num_cpus` and
    `commit.num_cpus`, Ray Data reserving each stage's share in stream order) leave: of the GPUs
    when it asks for a GPU, else of the CPUs. On an autoscaling cluster the inpainter pool
    autoscales, from what fits now up to what fits at the cluster's largest. A size given
    in the config (a number, or min_size and max_size) is kept.
    """
    stream = copy.deepcopy(stream)
    for name in ("captioner", "metrics"):
        stage = getattr(stream, name)
        if stage.size == AUTO and stage.min_size is None:
            stage.size = 1
    inpainter = stream.inpainter
    if inpainter.size != AUTO or inpainter.min_size is not None:
        return stream
    resource, each = ("GPU", inpainter.num_gpus) if inpainter.num_gpus else ("CPU", inpainter.num_cpus)

    def fits(resources: dict[str, float]) -> int:
        taken = sum((s.max_size or s.size) * (s.num_gpus if resource == "GPU" else s.num_cpus)
                    for s in (stream.captioner, stream.metrics))
        tasks = stream.read.num_cpus + stream.commit.num_cpus if resource == "CPU" else 0.0
        left = resources.get(resource, 0.0) - taken - tasks
        return max(1, math.floor(left / each + 1e-9)) if each > 0 else 1

    smallest = fits(now)
    largest = fits(most) if most else smallest
    if rows is not None:
        batches = max(1, math.ceil(rows / max(stream.read.batch_size, inpainter.batch_size)))
        smallest, largest = min(smallest, batches), min(largest, batches)
    if largest > smallest:
        inpainter.size, inpainter.min_size, inpainter.max_size = None, smallest, largest
    else:
        inpainter.size = smallest
    return stream


def size_pools(cfg: Config, rows: int) -> Config:
    """`cfg` with its `size: auto` stages sized for the connected cluster and the `rows` to
    do (`auto_sizes`); logs the sizes it chose."""
    # What the cluster may grow to: Ray Train and Ray Data read it from here too (None on a
    # cluster without an autoscaler).
    most = ray._private.state.state.get_max_resources_from_cluster_config()
    cfg = copy.deepcopy(cfg)
    cfg.stream = auto_sizes(cfg.stream, ray.cluster_resources(), most, rows)
    log.info("actor pools: %s", ", ".join(
        f"{name} {describe(getattr(cfg.stream, name))}" for name in MODEL_STAGES))
    return cfg


def describe(stage: StageConfig) -> str:
    count = f"{stage.min_size}-{stage.max_size}" if stage.min_size is not None else str(stage.size)
    return f"{count} x ({stage.num_cpus:g} CPU{f', {stage.num_gpus:g} GPU' if stage.num_gpus else ''})"


def pool(stage: StageConfig) -> ActorPoolStrategy:
    """A fixed pool of `size` actors, or an autoscaling one from `min_size` to `max_size`."""
    if stage.min_size is not None:
        return ActorPoolStrategy(min_size=stage.min_size, max_size=stage.max_size)
    return ActorPoolStrategy(size=stage.size)


def actor_resources(stage: StageConfig) -> dict:
    """`map_batches` arguments for an actor-pool stage (declared, never probed from CUDA)."""
    return dict(compute=pool(stage), batch_size=stage.batch_size, num_cpus=stage.num_cpus,
                num_gpus=stage.num_gpus or None)


