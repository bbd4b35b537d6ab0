"""The streaming plumbing the generate and evaluate jobs share: guarded model actors and
an exactly-once Parquet sink.

Rows that fail leave the stream where they fail, committed at once as error rows; the
rest reach `CommitSink`, where each write becomes one committed part (see
`blipinpaint.writer`). A rerun skips every id already committed.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import BlockAccessor

from blipinpaint.batches import Batch, Guarded
from blipinpaint.records import encode_rows
from blipinpaint.writer import CommitLog


class ErrorWriter:
    """Commits rows that failed, where they failed (a part of errors only, exactly once)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def __call__(self, rows: Batch) -> None:
        CommitLog(self.out_dir).commit(encode_rows(rows, models={}))


class ModelStage:
    """One actor of a model pool: builds its stage once (on this worker), then runs batches."""

    def __init__(self, name: str, build: Callable[[], Callable[[Batch], Batch]], out_dir: str, retries: int):
        self.run = Guarded(name, build(), ErrorWriter(out_dir), retries)

    def __call__(self, batch: Batch) -> Batch:
        return self.run(batch)


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
