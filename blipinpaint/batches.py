"""Batch plumbing shared by the runners: failed rows leave the stream where they fail.

A row that cannot be used (unreadable, undecodable, or in a batch a model stage keeps
failing on) is handed to an error sink at that point and dropped from the batch, so the
model stages only ever see good rows, every batch downstream has the same columns, and
every input is written exactly once: as a sample at the end, or as an error where it failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from blipinpaint.errors import JobError

Batch = dict[str, np.ndarray]
ErrorSink = Callable[[Batch], None]
log = logging.getLogger(__name__)



def take(batch: Batch, index) -> Batch:
    return {k: np.asarray(v)[index] for k, v in batch.items()}


def split_errors(batch: Batch, on_errors: ErrorSink) -> Batch:
    """Hand the rows whose `error` is set to `on_errors`; return the others."""
    failed = np.array([bool(e) for e in batch["error"]], dtype=bool)
    if failed.any():
        on_errors(take(batch, failed))
    return take(batch, ~failed) if failed.any() else batch


def count_once(batch: Batch, column: str, n: int) -> Batch:
    """Add `n` to `column` once per batch (on its first row), so the writer's per-column sum counts batches."""
    values = np.zeros(len(batch["id"]), dtype=np.int64)
    if len(values):
        values[0] = n
    batch[column] = np.asarray(batch.get(column, 0), dtype=np.int64) + values
    return batch


class Guarded:
    """Run `stage` on a batch, retrying a failure; a batch that keeps failing becomes errors,
    and so does each row the stage itself marked failed (its `error` set).

    Adds `seconds_<name>`: the stage's wall time per row of the batch, which the writer
    sums into per-stage throughput, and `retries_<name>`: the failed attempts.
    """

    def __init__(self, name: str, stage: Callable[[Batch], Batch], on_errors: ErrorSink, retries: int = 2):
        self.name, self.stage, self.on_errors, self.retries = name, stage, on_errors, retries

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["id"])
        if not n:
            return batch
        start = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                out = self.stage(batch)
                break
            except JobError:
                raise
            except Exception as err:  # noqa: BLE001 - one failing batch must not end the job
                log.warning("%s failed on a batch of %d (attempt %d of %d): %r",
                            self.name, n, attempt + 1, self.retries + 1, err)
                last = err
        else:
            reason = f"stage failed: {self.name} raised {type(last).__name__}: {last}"
            failed = count_once({**batch, "error": np.full(n, reason, dtype=object)}, f"retries_{self.name}",
                                self.retries)
            return split_errors(failed, self.on_errors)
        # Shared over the rows that leave: a stage may return more rows than it took (a row per caption candidate).
        rows = max(len(out["id"]), 1)
        out[f"seconds_{self.name}"] = np.full(len(out["id"]), (time.perf_counter() - start) / rows, dtype=np.float64)
        # A stage may fail single rows (an inpainting that came out NaN): they leave here.
        return split_errors(count_once(out, f"retries_{self.name}", attempt), self.on_errors)
