"""Exactly-once Parquet output, by role: the commit log (`blipinpaint.commit_log`), its
checkpoints (`blipinpaint.checkpoints`) and what its readers get (`blipinpaint.commits`).
The names stay importable from here, where they were first."""

from __future__ import annotations

import pyarrow.parquet as pq  # noqa: F401 (tests cut a Parquet write short through it)

from blipinpaint.checkpoints import COMPACT_EVERY, CompactedLog  # noqa: F401
from blipinpaint.commit_log import OWNER, RELEASED, CommitLog  # noqa: F401
from blipinpaint.commits import DATA_DIRS, RERUN_CAUSES, Account, Resumed, Superseded, part_name, stage_failure  # noqa: F401
