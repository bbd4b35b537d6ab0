"""What the commit log's readers get: a part's name, where the listed ids stand (`Account`),
what a run found when it took a folder over (`Resumed`). Storage-free: the log itself is
`blipinpaint.commit_log`."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from functools import cached_property

import pyarrow as pa
import pyarrow.compute as pc

from blipinpaint.errors import JobError

DATA_DIRS = ("samples", "errors")
# Why a batch ran again but for its stage raising, by the token in its rows' `reruns_<stage>_<token>`
# (`rayjobs.stream.AttemptLedger`): its worker died on it, its node did, or it finished but its output was lost.
RERUN_CAUSES = {"worker": "worker_died", "node": "node_lost", "output": "output_lost"}
NAMED = 5  # ids an error about missing or duplicated ids names, of each kind


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
    retried_ids: pa.Array  # ids of `stage failed` parts made pending again
    done_ids: pa.Array  # ids committed (as samples or errors), no Python object per id

    @cached_property
    def done(self) -> set[str]:
        """The committed ids as a Python set, made on first use (for small logs)."""
        return set(self.done_ids.to_pylist())

    @cached_property
    def retried(self) -> list[str]:
        """`retried_ids` as a Python list, made on first use (for small logs)."""
        return self.retried_ids.to_pylist()

    def undone(self, ids: list[str]) -> list[bool]:
        """Which of `ids` are not committed (one Arrow lookup, not a Python set of the log)."""
        return pc.invert(pc.is_in(pa.array(ids, pa.string()), value_set=self.done_ids)).to_pylist()


@dataclass
class Account:
    """Where the ids a run listed stand in its output folder (`CommitLog.account`). The ids are
    Arrow arrays (10^8 of them are gigabytes as Python strings): `ok` and `missing`, the
    Python set and list, are made on first use, for small logs and tests."""

    listed: int
    ok_ids: pa.Array  # listed ids committed as samples, a row per commit (`ok_count`: distinct)
    errors_by_reason: Counter  # listed ids committed as errors, by the kind of error
    missing_ids: pa.Array  # listed ids committed nowhere, sorted
    duplicates: int  # commits of an id beyond its first
    rows: int  # rows of every part, listed or not
    seconds: Counter = field(default_factory=Counter)  # busy seconds per stage over every part
    retries: Counter = field(default_factory=Counter)  # failed attempts per stage over every part
    reruns: dict[str, Counter] = field(default_factory=dict)  # stage -> runs again by cause (`RERUN_CAUSES`)
    files: dict[str, str] = field(default_factory=dict, repr=False)  # "folder/name" of data -> its part
    listed_ids: pa.Array | None = field(default=None, repr=False)  # the ids listed, distinct
    ok_parts: pa.ChunkedArray | None = field(default=None, repr=False)  # the part of each of `ok_ids`
    duplicated_ids: pa.Array | None = field(default=None, repr=False)  # ids committed more than once

    @cached_property
    def ok(self) -> set[str]:
        """`ok_ids` as a Python set (for small logs)."""
        return set(self.ok_ids.to_pylist())

    @cached_property
    def ok_count(self) -> int:
        """How many distinct listed ids are committed as samples (`ok_ids` has a row per commit)."""
        return len(self.ok_ids) if not self.duplicates else pc.count_distinct(self.ok_ids).as_py()

    @cached_property
    def missing(self) -> list[str]:
        """`missing_ids` as a Python list (for small logs)."""
        return self.missing_ids.to_pylist()

    @property
    def errors(self) -> int:
        return sum(self.errors_by_reason.values())

    @property
    def complete(self) -> bool:
        return not len(self.missing_ids) and not self.duplicates

    def with_missing(self, *more: pa.Array) -> Account:
        """This account with the ids of `more` missing too (sorted, each once)."""
        return replace(self, missing_ids=sorted_ids(self.missing_ids, *more))

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
        """A `JobError` saying how many are missing or duplicated, naming the first `NAMED` of
        each (not all: at 10^8 inputs the message would be gigabytes), unless every listed id
        is there once."""
        if not self.complete:
            named = "".join(f"; {kind}: {', '.join(first)}{', ...' if len(ids) > NAMED else ''}"
                            for kind, ids in (("missing", self.missing_ids), ("duplicated", self.duplicated_ids))
                            if ids is not None and (first := ids.slice(0, NAMED).to_pylist()))
            raise JobError(f"{out_dir}: {len(self.missing_ids)} {what} missing, {self.duplicates} duplicated; "
                           f"run the same command again to finish{named}")


def account_of(view, published: dict[str, set[str]], listed: pa.Array | pa.ChunkedArray | Collection[str]) -> Account:
    """`CommitLog.account` over the log's `view` (`log_table.LogView`) and the data folders'
    files (`published`, by folder)."""
    listed_ids = as_id_array(listed)  # made distinct below, unless every listed id is found once
    placed = {n for n, p in view.parts.items() if all(f"{n}.parquet" in published[f] for f in p["staged"])}
    rows = view.only(placed).ids
    ids, kinds = rows.column("id"), rows.column("error_kind").cast(pa.string())
    is_listed = pc.is_in(ids, value_set=listed_ids)
    errors = pc.value_counts(pc.filter(kinds, pc.and_(is_listed, pc.is_valid(kinds))))
    duplicates, ok = view.duplicates(), pc.and_(is_listed, pc.is_null(kinds))
    # As many distinct log rows listed as ids listed: each listed id is there once, the listing
    # held none twice, none is missing; known without hashing the listing again (a distinct
    # pass and a lookup of it took 30 s and 1 GB at 10^7 ids here).
    if not duplicates and (pc.sum(is_listed).as_py() or 0) == len(listed_ids):
        missing = pa.array([], pa.string())
    else:
        listed_ids = pc.unique(listed_ids)
        found = pc.is_in(listed_ids, value_set=as_id_array(ids))
        missing = sorted_ids(pc.filter(listed_ids, pc.invert(found)))
    account = Account(
        listed=len(listed_ids), ok_ids=as_id_array(ids.filter(ok)), ok_parts=rows.column("part").filter(ok),
        errors_by_reason=Counter({e["values"]: e["counts"] for e in errors.to_pylist()}),
        missing_ids=missing,
        duplicates=duplicates, rows=view.ids.num_rows,
        files={f"{f}/{n}.parquet": n for n in placed for f in view.parts[n]["staged"]}, listed_ids=listed_ids,
        duplicated_ids=duplicated_ids(view.id_array()) if duplicates else None)
    for m in view.parts.values():
        account.seconds.update(m["seconds"])
        account.retries.update(m["retries"])
        for stage, causes in m.get("reruns", {}).items():  # markers of earlier versions have none
            account.reruns.setdefault(stage, Counter()).update(causes)
    return account


def sorted_ids(*arrays: pa.Array) -> pa.Array:
    """The distinct ids of `arrays`, sorted, as one string array."""
    chunks = [c for a in arrays for c in (a.chunks if isinstance(a, pa.ChunkedArray) else [a])]
    ids = pc.unique(pa.chunked_array([c.cast(pa.string()) for c in chunks], pa.string()).combine_chunks())
    return ids.take(pc.sort_indices(ids)) if len(ids) else ids


def as_id_array(ids: pa.Array | pa.ChunkedArray | Collection[str]) -> pa.Array:
    """Ids as one Arrow string array: an Arrow array as it is, a collection converted."""
    if isinstance(ids, pa.ChunkedArray):
        return ids.combine_chunks() if ids.num_chunks else pa.array([], pa.string())
    if isinstance(ids, pa.Array):
        return ids
    return pa.array(ids if isinstance(ids, list) else list(ids), pa.string())


def duplicated_ids(ids: pa.Array) -> pa.Array:
    """The ids that occur more than once, sorted."""
    counts = pc.value_counts(ids)
    return sorted_ids(pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)))


def stage_failed_parts(ids: pa.Table) -> set[str]:
    """`stage_failure` over a log's id rows (`LogView.ids`: part, id, error_kind), in Arrow:
    the parts whose every row is a `stage failed` error (one Python object per part)."""
    part, kind = ids.column("part"), ids.column("error_kind").cast(pa.string())
    other = pc.fill_null(pc.not_equal(kind, "stage failed"), True)  # a sample's kind is null
    names = pc.unique(part.cast(pa.string()))
    spoiled = pc.unique(pc.filter(part, other).cast(pa.string()))
    return set(pc.filter(names, pc.invert(pc.is_in(names, value_set=spoiled))).to_pylist())


def part_name(ids: list[str]) -> str:
    """A part's name: a digest of its ids, in any order. The ids are encoded as a JSON list,
    so that no two lists share an encoding (ids joined by newlines did: an id may hold one).
    Parts committed under that earlier naming keep their names: each marker carries its own."""
    digest = hashlib.blake2b(json.dumps(sorted(ids)).encode(), digest_size=10).hexdigest()
    return f"part-{digest}"
