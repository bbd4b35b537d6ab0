"""What the commit log's readers get: a part's name, where the listed ids stand (`Account`),
what a run found when it took a folder over (`Resumed`). Storage-free: the log itself is
`blipinpaint.commit_log`."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

import pyarrow as pa
import pyarrow.compute as pc

from blipinpaint.errors import JobError

DATA_DIRS = ("samples", "errors")
# Why a batch ran again but for its stage raising, by the token in its rows' `reruns_<stage>_<token>`
# (`rayjobs.stream.AttemptLedger`): its worker died on it, its node did, or it finished but its output was lost.
RERUN_CAUSES = {"worker": "worker_died", "node": "node_lost", "output": "output_lost"}


class Superseded(JobError):
    """Another run has taken over the output folder: this writer must not commit."""


def stage_failure(marker: dict) -> bool:
    """A part holding only rows of a batch a model stage failed on (raised, or its worker died)."""
    kinds = marker["error_kinds"]
    return not marker["samples"] and bool(kinds) and all(kind == "stage failed" for kind in kinds)


@dataclass
class Resumed:
    """What a run found in its output folder when it took it over (`CommitLog.resume`)."""

    owner: str  # this run's token
    recovered: dict[str, int]  # what `recover` finished and undid
    retried: list[str]  # ids of `stage failed` parts made pending again
    done_ids: pa.Array  # ids committed (as samples or errors), no Python object per id

    @cached_property
    def done(self) -> set[str]:
        """The committed ids as a Python set, made on first use (for small logs)."""
        return set(self.done_ids.to_pylist())

    def undone(self, ids: list[str]) -> list[bool]:
        """Which of `ids` are not committed (one Arrow lookup, not a Python set of the log)."""
        return pc.invert(pc.is_in(pa.array(ids, pa.string()), value_set=self.done_ids)).to_pylist()


@dataclass
class Account:
    """Where the ids a run listed stand in its output folder (`CommitLog.account`)."""

    listed: int
    ok: set[str]  # listed ids committed as samples
    errors_by_reason: Counter  # listed ids committed as errors, by the kind of error
    missing: list[str]  # listed ids committed nowhere
    duplicates: int  # commits of an id beyond its first
    rows: int  # rows of every part, listed or not
    seconds: Counter = field(default_factory=Counter)  # busy seconds per stage over every part
    retries: Counter = field(default_factory=Counter)  # failed attempts per stage over every part
    reruns: dict[str, Counter] = field(default_factory=dict)  # stage -> runs again by cause (`RERUN_CAUSES`)
    files: dict[str, str] = field(default_factory=dict, repr=False)  # "folder/name" of data -> its part
    listed_ids: pa.Array | None = field(default=None, repr=False)  # the ids listed, distinct

    @property
    def errors(self) -> int:
        return sum(self.errors_by_reason.values())

    @property
    def complete(self) -> bool:
        return not self.missing and not self.duplicates

    def stages(self) -> dict[str, dict]:
        """Busy time per stage over all committed rows: rows per second of one worker."""
        return {s: {"busy_s": round(t, 3), "rows_per_s_per_worker": round(self.rows / t, 3) if t else None,
                    "retries": self.retries[s]} for s, t in self.seconds.items()}

    def reruns_by_cause(self) -> dict[str, dict[str, int]]:
        """Why batches ran again over every part, per stage: `raised` (the stage raised on an
        attempt) and the causes the run's ledger tells apart (`RERUN_CAUSES`); none left out."""
        counts = {s: {"raised": self.retries[s] - (c := self.reruns.get(s, Counter()))["worker_died"] - c["node_lost"],
                      **{name: c[name] for name in RERUN_CAUSES.values()}}
                  for s in sorted(set(self.retries) | set(self.reruns))}
        return {s: c for s, c in counts.items() if any(c.values())}

    def check(self, out_dir: str, what: str) -> None:
        """A `JobError` naming what is missing or duplicated, unless every listed id is there once."""
        if not self.complete:
            raise JobError(f"{out_dir}: {len(self.missing)} {what} missing, {self.duplicates} duplicated; "
                           "run the same command again to finish")


def part_name(ids: list[str]) -> str:
    """A part's name: a digest of its ids, in any order. The ids are encoded as a JSON list,
    so that no two lists share an encoding (ids joined by newlines did: an id may hold one).
    Parts committed under that earlier naming keep their names: each marker carries its own."""
    digest = hashlib.blake2b(json.dumps(sorted(ids)).encode(), digest_size=10).hexdigest()
    return f"part-{digest}"
