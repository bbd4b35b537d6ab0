"""The streaming plumbing the generate and evaluate jobs share: guarded model actors and
an exactly-once Parquet sink.

Rows that fail leave the stream where they fail, committed at once as error rows; the
rest reach `CommitSink`, where each write becomes one committed part (see
`blipinpaint.writer`). A rerun skips every id already committed.

Two kinds of failure are bounded here. A stage that raises on a batch is retried in place
(`Guarded`). A batch on which the worker process itself dies (a segfault, the OOM killer,
a lost spot node) is retried by Ray on a restarted actor, without limit; `Attempts` counts
those starts in the output folder, so after `retries` deaths the batch becomes error rows
instead of killing actors forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from pyarrow import fs as pafs
from ray.data import Datasink
from ray.data.block import BlockAccessor

from blipinpaint.batches import Batch, Guarded, count_once, split_errors
from blipinpaint.config import FaultConfig
from blipinpaint.records import encode_rows
from blipinpaint.storage import filesystem
from blipinpaint.writer import CommitLog, part_name


class StageStartError(RuntimeError):
    """A model stage could not start (its model did not load): no batch can run, so the job stops."""


@contextlib.contextmanager
def stage_start_errors():
    """Raise a stage's start failure, which reaches the driver inside Ray's actor-death error, as one line."""
    try:
        yield
    except StageStartError:
        raise
    except Exception as err:
        found = re.search(r"StageStartError: (.+)", str(err))
        if found is None:
            raise
        raise StageStartError(found.group(1).strip()) from None


class ErrorWriter:
    """Commits rows that failed, where they failed (a part of errors only, exactly once)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def __call__(self, rows: Batch) -> None:
        CommitLog(self.out_dir).commit(encode_rows(rows, models={}))


class Attempts:
    """How many times each batch was started in a stage, kept in `<out_dir>/_attempts/`.

    A start is recorded before the stage runs and removed when it returns, so a count
    that survives is the number of times a worker died on that batch.
    """

    def __init__(self, out_dir: str, stage: str):
        self.fs, root = filesystem(out_dir)
        self.dir, self.stage = posixpath.join(root, "_attempts"), stage

    def _path(self, ids) -> str:
        return posixpath.join(self.dir, f"{self.stage}-{part_name(list(ids))}.json")

    def start(self, ids) -> int:
        """Record a start of the batch `ids`; return how many starts it has had, this one included."""
        path = self._path(ids)
        started = 0
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            with self.fs.open_input_stream(path) as f:
                started = json.loads(f.read())["started"]
        self.fs.create_dir(self.dir, recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(json.dumps({"started": started + 1}).encode())
        return started + 1

    def done(self, ids) -> None:
        path = self._path(ids)
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)

    @staticmethod
    def reset(out_dir: str) -> None:
        """Forget earlier runs' counts: a driver killed mid-batch is not the batch's fault."""
        fs, root = filesystem(out_dir)
        fs.delete_dir_contents(posixpath.join(root, "_attempts"), missing_dir_ok=True)


def raising(name: str, stage: Callable[[Batch], Batch], fault: FaultConfig | None) -> Callable[[Batch], Batch]:
    """`stage`, raising on every batch that holds `fault.id` when `fault.stage` is `name` (tests)."""
    if fault is None or fault.stage != name or fault.exit:
        return stage

    def faulty(batch: Batch) -> Batch:
        if fault.id in set(batch["id"]):
            raise RuntimeError(f"injected failure on {fault.id!r}")
        return stage(batch)

    return faulty


class ModelStage:
    """One actor of a model pool: builds its stage once (on this worker), then runs batches."""

    def __init__(self, name: str, build: Callable[[], Callable[[Batch], Batch]], out_dir: str, retries: int,
                 fault: FaultConfig | None = None):
        try:
            stage = build()
        except Exception as err:  # noqa: BLE001 - whatever the loader raised, say which stage and why
            raise StageStartError(f"the {name} stage cannot start: {type(err).__name__}: {err}") from err
        self.name, self.retries, self.errors = name, retries, ErrorWriter(out_dir)
        self.attempts, self.fault = Attempts(out_dir, name), fault
        self.run = Guarded(name, raising(name, stage, fault), self.errors, retries)

    def __call__(self, batch: Batch) -> Batch:
        ids = batch["id"]
        if not len(ids):
            return batch
        started = self.attempts.start(ids)
        if started > self.retries + 1:
            reason = f"stage failed: {self.name} worker died on this batch {started - 1} times"
            failed = {**batch, "error": np.full(len(ids), reason, dtype=object)}
            out = split_errors(count_once(failed, f"retries_{self.name}", started - 1), self.errors)
        else:
            self._maybe_die(ids, started)
            out = self.run(batch)
            if started > 1:  # the restarts of workers that died on this batch
                count_once(out, f"retries_{self.name}", started - 1)
        self.attempts.done(ids)
        return out

    def _maybe_die(self, ids, started: int) -> None:
        """Fault injection (tests): this process exits, as a segfault or the OOM killer would end it."""
        f = self.fault
        if (f is not None and f.exit and f.stage == self.name and f.id in set(ids)
                and (f.times is None or started <= f.times)):
            os._exit(1)


class CommitSink(Datasink):
    """Each write call becomes one committed part of `out_dir`, in `schema`."""

    def __init__(self, out_dir: str, rows_per_file: int, schema: pa.Schema):
        self.out_dir, self.rows_per_file, self.schema = out_dir, rows_per_file, schema

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> None:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        table = pa.concat_tables(tables) if tables else None
        if table is not None and table.num_rows:
            CommitLog(self.out_dir, self.schema).commit(table)
