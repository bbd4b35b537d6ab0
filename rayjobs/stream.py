"""The streaming plumbing of the generate, candidates and evaluate jobs: guarded model
actors, an exactly-once Parquet sink, and the run of a stream with its progress line.

Rows that fail leave the stream where they fail, committed at once as error rows; the
rest reach `commit_part`, where each batch becomes one committed part. Failures are
bounded: a stage that raises on a batch is retried in place (`Guarded`); a batch on which
the worker process itself dies is retried by Ray on a restarted actor, and `AttemptLedger`
counts those starts, so after `retries` deaths the batch becomes error rows.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import ray
from ray.data._internal.logical.operators.map_operator import StreamingRepartition
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from blipinpaint.batches import Batch, Guarded, count_once, split_errors
from blipinpaint.commit_log import CommitLog
from blipinpaint.commits import RERUN_CAUSES, Superseded, part_name
from blipinpaint.config import Config, FaultConfig, StreamConfig
from blipinpaint.errors import JobError
from blipinpaint.layout import Folder
from blipinpaint.reader import read_rows
from blipinpaint.records import encode_rows
from blipinpaint.storage import write_text
from rayjobs.cluster import actor_resources, connect, size_pools
from rayjobs.progress import CommitProgress, PoolWatch

# bench/stream_split.py sets it: the stream's actors and commit tasks then say when they start,
# are built and run batches (`trace`), one line each to stderr (wall clock, epoch seconds).
TRACE_ENV = "BLIPINPAINT_STREAM_TRACE"


def trace(what: str) -> None:
    """With $BLIPINPAINT_STREAM_TRACE set: `[stream-trace] <what> pid=… process=<its start> at=<now>`."""
    if not os.environ.get(TRACE_ENV):
        return
    try:  # this process's start (Linux): its start in clock ticks after boot, plus the boot time
        ticks = int(open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        began = f"{boot + ticks / os.sysconf('SC_CLK_TCK'):.2f}"
    except (OSError, ValueError, IndexError, StopIteration):
        began = "?"
    sys.stderr.write(f"[stream-trace] {what} pid={os.getpid()} process={began} at={time.time():.3f}\n")
    sys.stderr.flush()


class StageStartError(JobError):
    """A model stage could not start (its model did not load): no batch can run, so the job stops."""


JOB_ERRORS = (StageStartError, Superseded)  # what ends a job with one line and exit code 1
# Deaths of a task's worker Ray retries, where no ledger counts them (Ray Data's default is
# without limit): a part that cannot be committed or read after that ends the job.
TASK_RETRIES = 3


@contextlib.contextmanager
def job_errors(errors: tuple[type[JobError], ...] = JOB_ERRORS):
    """Re-raise one of `errors` that reaches the driver wrapped in Ray's errors (whose text
    is a remote traceback, even where the type matches) as itself, in one line."""
    try:
        yield
    except Exception as err:
        for error in errors:
            found = re.search(rf"{error.__name__}: (.+)", str(err))
            if found is not None:
                raise error(found.group(1).strip()) from None
        raise


class ErrorWriter:
    """Commits rows that failed, where they failed (a part of errors only, exactly once)."""

    def __init__(self, out_dir: str, owner: str | None = None):
        self.out_dir, self.owner = out_dir, owner

    def __call__(self, rows: Batch) -> None:
        CommitLog(self.out_dir, owner=self.owner).commit(encode_rows(rows, models={}))


def here() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
class AttemptLedger:
    """Each batch's starts in each stage during this run, and each pool actor's.

    A start is recorded before the stage runs and marked finished when it returns, so the
    starts since a batch last finished are the number of times a worker died on it. Why it
    runs again is read from the node of its previous start (gone: the node was lost), or
    from its having finished (its output was lost with the worker or node holding it). Pool
    actors say where they start (`joined`): an actor that starts again was restarted. One
    small actor per run, on the driver's node: an actor call per batch, where a file in a
    bucket would cost a few object-store requests per batch.
    """

    def __init__(self):
        self.batches: dict[str, dict] = {}  # key -> {starts since finished, node, finished, causes}
        self.actors: dict[str, str] = {}  # actor id -> the node of its last start
        self.restarts: dict[str, Counter] = {}  # stage -> actor restarts by cause

    def _death(self, node: str) -> str:
        """Why a worker on `node` is gone: its node was lost, or only its process died."""
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}  # only asked after a death
        return "worker" if node in alive else "node"

    def start(self, key: str) -> int:
        """Record a start of batch `key`; return the starts since it last finished."""
        return self.attempt(key, "")[0]

    def attempt(self, key: str, node: str) -> tuple[int, dict[str, int]]:
        """Record a start of batch `key` on `node`: (starts since it last finished, why it
        ran again over this run: cause -> times)."""
        batch = self.batches.setdefault(key, {"starts": 0, "node": node, "finished": False, "causes": Counter()})
        if batch["finished"]:
            batch["causes"]["output"] += 1
            batch["starts"], batch["finished"] = 0, False
        elif batch["starts"]:
            batch["causes"][self._death(batch["node"])] += 1
        batch["starts"] += 1
        batch["node"] = node
        return batch["starts"], dict(batch["causes"])

    def done(self, key: str) -> None:
        self.batches[key]["finished"] = True

    def joined(self, stage: str, actor: str, node: str) -> None:
        """A pool actor of `stage` (re)started on `node`."""
        if actor in self.actors:
            self.restarts.setdefault(stage, Counter())[self._death(self.actors[actor])] += 1
        self.actors[actor] = node

    def restarted(self) -> dict[str, dict[str, int]]:
        """Actor restarts by stage and cause (`RERUN_CAUSES`' names)."""
        return {stage: {RERUN_CAUSES[c]: n for c, n in sorted(causes.items())}
                for stage, causes in sorted(self.restarts.items())}


@contextlib.contextmanager
def attempt_ledger():
    """A ledger for this run, pinned to the driver's node (which lives as long as the run).

    Ended with the run: Ray Data keeps the plan that holds its handle, so in a driver that
    runs several jobs (a notebook, the pipeline) each run's ledger would otherwise live on."""
    ledger = AttemptLedger.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here(), soft=False)).remote()
    try:
        yield ledger
    finally:
        ray.kill(ledger)


def hold(fault: FaultConfig | None, name: str, ids) -> None:
    """Node-loss tests: on the batch holding `fault.id` in stage `name`, say so in
    `<fault.hold>.reached` and wait until the file `fault.hold` exists (the test removes this
    worker's node meanwhile, then lets the batch's retry through)."""
    if fault is None or fault.hold is None or fault.stage != name or fault.id not in {str(i) for i in ids}:
        return
    with open(f"{fault.hold}.reached", "a") as f:
        f.write(f"{os.getpid()}\n")
    while not os.path.exists(fault.hold):
        time.sleep(0.05)


def raising(name: str, stage: Callable[[Batch], Batch], fault: FaultConfig | None) -> Callable[[Batch], Batch]:
    """`stage`, raising on every batch that holds `fault.id` when `fault.stage` is `name` (tests)."""
    if fault is None or fault.stage != name or fault.exit or fault.hold is not None:
        return stage

    def faulty(batch: Batch) -> Batch:
        if fault.id in set(batch["id"]):
            raise RuntimeError(f"injected failure on {fault.id!r}")
        return stage(batch)

    return faulty


class ModelStage:
    """One actor of a model pool: builds its stage once (on this worker), then runs batches."""

    def __init__(self, name: str, build: Callable[[], Callable[[Batch], Batch]], errors: ErrorWriter, retries: int,
                 ledger, fault: FaultConfig | None = None):
        trace(f"{name} init")
        # Said first: an actor that starts again was restarted (`AttemptLedger.joined`).
        ledger.joined.remote(name, ray.get_runtime_context().get_actor_id(), here())
        try:
            stage = build()
        except Exception as err:  # noqa: BLE001 - whatever the loader raised, say which stage and why
            raise StageStartError(f"the {name} stage cannot start: {type(err).__name__}: {err}") from err
        trace(f"{name} built")
        self.name, self.retries, self.errors, self.ledger, self.fault = name, retries, errors, ledger, fault
        self.run = Guarded(name, raising(name, stage, fault), errors, retries)

    def __call__(self, batch: Batch) -> Batch:
        trace(f"{self.name} batch")
        out = counted(self.name, self.run, batch, self.ledger, self.retries, self.errors, self.fault)
        trace(f"{self.name} done")
        return out


def counted(name: str, run: Callable[[Batch], Batch], batch: Batch, ledger, retries: int, errors: ErrorWriter,
            fault: FaultConfig | None = None) -> Batch:
    """`run(batch)`, each start recorded in the run's ledger: once the workers running `name`
    have died on this batch `retries` times, its rows become error rows instead. The rows
    that leave carry its worker deaths (`retries_<name>`) and why it ran again
    (`reruns_<name>_<cause>`)."""
    ids = batch["id"]
    if not len(ids):
        return batch
    key = f"{name}-{part_name([str(i) for i in ids])}"
    started, causes = ray.get(ledger.attempt.remote(key, here()))
    if started > retries + 1:
        reason = f"stage failed: {name} worker died on this batch {started - 1} times"
        out = split_errors(rerun(name, {**batch, "error": np.full(len(ids), reason, dtype=object)}, causes), errors)
    else:
        maybe_die(fault, name, ids, started)
        hold(fault, name, ids)
        out = rerun(name, run(batch), causes)
    ledger.done.remote(key)
    return out


def rerun(name: str, out: Batch, causes: dict[str, int]) -> Batch:
    """`out` with why its batch ran again in `name` counted once: the deaths of its workers
    among the stage's failed attempts (`retries_<name>`), each cause in a column of its own.
    Every column on every batch, zeros too: blocks with and without a column, joined in one
    batch downstream, would leave its rows empty (read as garbage, not 0)."""
    count_once(out, f"retries_{name}", causes.get("worker", 0) + causes.get("node", 0))
    for cause in RERUN_CAUSES:
        count_once(out, f"reruns_{name}_{cause}", causes.get(cause, 0))
    return out


def counted_task(batch: Batch, name: str, run: Callable[[Batch], Batch], ledger, retries: int,
                 errors: ErrorWriter, fault: FaultConfig | None = None) -> Batch:
    """A CPU task's `run` through `counted`: Ray retries a task whose worker died without
    limit, so an input that kills its reader every time would otherwise stall the run."""
    return counted(name, run, batch, ledger, retries, errors, fault)


def maybe_die(fault: FaultConfig | None, name: str, ids, started: int) -> None:
    """Fault injection (tests): this process exits, as a segfault or the OOM killer would end it."""
    if (fault is not None and fault.exit and fault.stage == name and fault.id in set(ids)
            and (fault.times is None or started <= fault.times)):
        os._exit(1)


def model_stages(ds: ray.data.Dataset, builders: dict[str, Callable[[], Callable[[Batch], Batch]]],
                 stream: StreamConfig, errors: ErrorWriter, ledger) -> ray.data.Dataset:
    """`ds` through a pool of `ModelStage` actors per entry of `builders` (stage name -> what
    builds it), each pool as `stream.<name>` says; a pool that loses actors says so, and
    again when it has them all back (`PoolWatch`)."""
    for name, build in builders.items():
        ds = ds.map_batches(ModelStage, fn_constructor_kwargs={"name": name, "build": build, "errors": errors,
                                                               "retries": stream.batch_retries, "ledger": ledger,
                                                               "fault": stream.inject_failure},
                            **actor_resources(getattr(stream, name)))
    ds.context.custom_execution_callback_classes.append(PoolWatch.over(list(builders)))  # this dataset's only
    return ds


def commit_part(batch: Batch, out_dir: str, schema: pa.Schema, models: dict[str, str],
                owner: str | None = None, ledger=None) -> dict:
    """CPU task, the stream's last stage: encode a batch of finished rows (PNGs, Arrow) and
    commit it as one part of `out_dir`, where the rows are. Returns {part, rows}.

    Not a Ray Data write: a write task asks for CPU that the model pools hold while the
    stream runs, so Ray Data held every finished row back until the pools were done and
    committed them all at the end (measured: no commit in 24 minutes of a 10,000-input
    run; everything finished but uncommitted lost to a kill). This stage runs like the
    others, on the worker that encoded the rows; a retried task rewrites the same part.
    """
    trace("commit batch")
    if not len(batch["id"]):
        return {"part": np.array([], dtype=object), "rows": np.array([], dtype=np.int64)}
    if ledger is not None:  # a commit its node took with it runs again (Ray's retry): counted
        key = f"commit-{part_name([str(i) for i in batch['id']])}"
        batch = rerun("commit", batch, ray.get(ledger.attempt.remote(key, here()))[1])
    marker = CommitLog(out_dir, schema, owner).commit(encode_rows(batch, models, schema))
    if ledger is not None:
        ledger.done.remote(key)
    return {"part": np.array([marker["name"]], dtype=object),
            "rows": np.array([len(batch["id"])], dtype=np.int64)}


def in_blocks_of(ds: ray.data.Dataset, rows: int, num_cpus: float,
                 compute: ray.data.TaskPoolStrategy | None = None) -> ray.data.Dataset:
    """`ds`'s last stage (a listing task, e.g. generate's per shard group) with its rows cut
    into blocks of `rows`, in the same task. A shard group's 10,000 rows in one block went
    whole to one `prepare` task, whose output blocks grew to Ray Data's 128 MiB before
    anything moved on, and Ray Data fused the listing with `prepare` into tasks of
    `read.batch_size` groups (320,000 rows): at 10^6 inputs no part was committed in 13
    minutes (BENCHMARKS.md). Ray Data's streaming repartition fuses with the listing only
    when both ask for the same resources (`num_cpus`) and task pool (`compute`), and
    `repartition` takes neither: its logical operator's are set here (Ray 2.60)."""
    ds = ds.repartition(target_num_rows_per_block=rows)
    op = ds._logical_plan.dag
    if not isinstance(op, StreamingRepartition):  # a Ray whose repartition plans otherwise: say so, never hang
        raise RuntimeError(f"ray.data repartition planned {type(op).__name__}, not StreamingRepartition")
    op.ray_remote_args["num_cpus"] = num_cpus
    object.__setattr__(op, "compute", compute)  # a frozen dataclass
    return ds


def commit_stage(ds: ray.data.Dataset, out_dir: str, schema: pa.Schema, models: dict[str, str], rows_per_file: int,
                 num_cpus: float, owner: str | None = None, ledger=None) -> ray.data.Dataset:
    """`ds` committed in parts of at most `rows_per_file` rows (`commit_part`), each start in
    `ledger` when one is given."""
    return ds.map_batches(commit_part, fn_kwargs={"out_dir": out_dir, "schema": schema, "models": models,
                                                  "owner": owner, "ledger": ledger},
                          batch_size=rows_per_file, num_cpus=num_cpus, max_retries=TASK_RETRIES)


def read_committed(reads: list[dict], columns: list[str], num_cpus: float) -> ray.data.Dataset:
    """A dataset of the committed rows `reads` (`reader.row_reads`) name: one read task per part."""
    ds = ray.data.from_items(reads, override_num_blocks=max(len(reads), 1))
    return ds.map_batches(read_rows, fn_kwargs={"columns": columns}, batch_size=1, num_cpus=num_cpus,
                          max_retries=TASK_RETRIES)


def run_stream(cfg: Config, job: str, out_dir: str, total: int, done: int, pool_rows: int,
               build: Callable[[Config, object], ray.data.Dataset]) -> tuple[float, dict[str, dict[str, int]]]:
    """Run a streaming job's dataset to its last commit; return its seconds and its pool
    actors' restarts (`AttemptLedger.restarted`).

    `build(cfg, ledger)` makes the dataset, with `cfg`'s pools sized for the cluster and
    `pool_rows` rows to do; the job's progress line counts commits of `total` ids into
    `out_dir`, `done` of them before this run. Ray Data's statistics go to `ray_stats.txt`.
    """
    connect(cfg.ray_address, cfg.ray_progress)
    cfg = size_pools(cfg, pool_rows)
    started = time.perf_counter()
    with attempt_ledger() as ledger, job_errors(), CommitProgress(job, out_dir, total, done, cfg.progress_s):
        ds = build(cfg, ledger).materialize()  # {part, rows} per commit: nothing else reaches the driver
        restarts = ray.get(ledger.restarted.remote())
    seconds = time.perf_counter() - started
    write_text(Folder(out_dir).ray_stats, ds.stats())
    return seconds, restarts
