"""`dry_run=true`: what a generate run would do and cost, before a model is fetched or started.

It lists the inputs in pages (`source_pages.iter_inputs`: a WebDataset source a few shards
at a time, each page counted, digested and checked against the log, then dropped), reads the
output folder's commit log (read only: no take-over, no recovery), and says how many inputs
there are, how many are committed, how many are left and in how many parts. When parts are
committed, their markers hold each stage's busy seconds (`seconds_<stage>` summed per part):
at those rates it estimates the actor-seconds each stage needs for what is left, and the
GPU-hours of the stages that hold GPUs (`stream.<stage>.num_gpus` per actor). The plan is
the only file written: `run_dir/plan.json`, saying what made it (the settings' digest, the
listed inputs' digest, what the folder recorded).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from blipinpaint import fingerprint
from blipinpaint.commit_log import CommitLog
from blipinpaint.commits import stage_failed_parts
from blipinpaint.config import Config
from blipinpaint.layout import Folder, RunLayout
from blipinpaint.storage import is_file, read_text, write_text

PLAN = "plan.json"


def inputs_digest(items: list[dict]) -> str:
    """A digest of the listed inputs: each id and where it is read from, in listing order."""
    digest = hashlib.sha256()
    _digest_page(digest, items)
    return digest.hexdigest()


def _digest_page(digest, items: list[dict]) -> None:
    for item in items:
        digest.update(json.dumps([item["id"], item.get("source", "")]).encode() + b"\n")


class SortedIds:
    """Committed ids, sorted once, looked up a page at a time. `pc.is_in` hashes its whole
    value set on every call: against the 10^7 ids of a log that is 1.5-2.8 s a page here, so
    a listing of 1,000 shard groups checked page by page cost about an hour (a rerun with
    nothing to do at 10^7, BENCHMARKS.md). A page's ids can only be among the committed ids
    between its smallest and its largest, a few of one shard group's: those are hashed."""

    def __init__(self, ids: pa.Array | pa.ChunkedArray):
        ids = ids.drop_null()
        self.ids = ids.take(pc.sort_indices(ids))
        if isinstance(self.ids, pa.ChunkedArray):
            self.ids = self.ids.combine_chunks()

    @classmethod
    def of(cls, done) -> SortedIds:
        """`done` as `committed_filter` takes it (or already sorted: not sorted again)."""
        if isinstance(done, SortedIds):
            return done
        if not isinstance(done, pa.Array | pa.ChunkedArray):
            done = pa.array(sorted(done), pa.string())
        return cls(done)

    def _first_at_least(self, value: str, strictly: bool = False) -> int:
        """The index of the first id at or above `value` (above it, with `strictly`): Arrow sorts
        strings by their UTF-8 bytes, which is Python's order of code points."""
        lo, hi = 0, len(self.ids)
        while lo < hi:
            mid = (lo + hi) // 2
            here = self.ids[mid].as_py()
            if here < value or (strictly and here == value):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def held(self, page: pa.Array) -> pa.BooleanArray:
        """Which of `page`'s ids are among these."""
        if not len(page) or not len(self.ids):
            return pa.array([False] * len(page), pa.bool_())
        smallest, largest = pc.min_max(page).values()
        lo = self._first_at_least(smallest.as_py())
        span = self.ids.slice(lo, self._first_at_least(largest.as_py(), strictly=True) - lo)
        return pc.is_in(page, value_set=span)


def committed_filter(done) -> Callable[[list[str]], list[str]]:
    """Which of a page's ids are committed, given what the log holds: an Arrow array of ids
    (`CommitLog.committed_id_array`, `resume().done_ids`: sorted once, `SortedIds`, no Python
    object per committed id; or a `SortedIds` already made) or a small collection of them.
    The one place a reader of listing pages (this plan, a generate run's listing tasks)
    checks ids against the log."""
    if isinstance(done, SortedIds | pa.Array | pa.ChunkedArray):
        index = SortedIds.of(done)

        def committed(ids: list[str]) -> list[str]:
            page = pa.array(ids, pa.string())
            return page.filter(index.held(page)).to_pylist()
        return committed
    return lambda ids: [i for i in ids if i in done]


def read_pages(done, pages: Iterable[list[dict]], keep_absent: bool = False) -> Listed:
    """Count, digest and check each page against `done` (as `committed_filter` takes it), then
    drop it: what is kept is the listed ids the log holds (and, with `keep_absent`, the ones
    it does not), as Arrow arrays: a chunk per page, no Python object per id."""
    index = SortedIds.of(done)
    hits, absent, listed, digest = [], [], Listed(), hashlib.sha256()
    for page in pages:
        ids = pa.array([it["id"] for it in page], pa.string())
        listed.inputs += len(ids)
        _digest_page(digest, page)
        held = index.held(ids)
        hits.append(ids.filter(held))
        if keep_absent:
            absent.append(ids.filter(pc.invert(held)))
    listed.hits, listed.absent = pa.chunked_array(hits, pa.string()), pa.chunked_array(absent, pa.string())
    listed.digest = digest.hexdigest()
    return listed


@dataclass
class Listed:
    """What `read_pages` keeps of a listing: never one item per input."""

    inputs: int = 0
    digest: str = ""
    hits: pa.ChunkedArray = field(default_factory=lambda: pa.chunked_array([], pa.string()))  # ids the log holds
    absent: pa.ChunkedArray = field(default_factory=lambda: pa.chunked_array([], pa.string()))  # ones it does not


def _recorded(out_dir: Folder, settings: dict) -> dict:
    """What the folder recorded, and whether a real run would resume it or refuse (the models
    are not compared: a dry run hashes none)."""
    path = out_dir.fingerprint
    if not is_file(path):
        return {"fingerprint": None, "differs": []}
    recorded = json.loads(read_text(path))
    return {"fingerprint": fingerprint.digest_of(recorded),
            "differs": fingerprint.differing({k: recorded.get(k) for k in settings}, settings)}


def estimate(seconds: dict[str, float], rows: int, to_do: int, cfg: Config) -> dict | None:
    """Actor-seconds per stage for `to_do` rows at the rates of `rows` committed ones (`seconds`:
    busy seconds per stage over them), and the GPU-hours of the stages holding GPUs."""
    if not rows or not seconds:
        return None
    stages = {}
    for stage, busy in sorted(seconds.items()):
        per_row = busy / rows
        gpus = getattr(getattr(cfg.stream, stage, None), "num_gpus", 0.0) or 0.0
        stages[stage] = {"s_per_row": round(per_row, 6), "actor_s": round(per_row * to_do, 3),
                         "gpus_per_actor": gpus, "gpu_h": round(per_row * to_do * gpus / 3600, 6)}
    return {"from_rows": rows, "stages": stages, "actor_h": round(sum(s["actor_s"] for s in stages.values()) / 3600, 6),
            "gpu_h": round(sum(s["gpu_h"] for s in stages.values()), 6)}


def plan(cfg: Config, pages: Iterable[list[dict]]) -> dict:
    """The plan of a generate run over the listed inputs, given as `pages` (lists of items, as
    `source_pages.iter_inputs` yields them): a page is counted, digested and checked against
    the log, then dropped, so what the plan holds is the committed ids, not the listing.
    Written to `run_dir/plan.json`."""
    out_dir = RunLayout(cfg.run_dir).generate
    log = CommitLog(out_dir)
    listed = read_pages(log.committed_id_array(), pages)
    inputs, hits = listed.inputs, listed.hits
    # The listed ids the log names, accounted for: a part whose files are gone counts as missing.
    account = log.account(hits)
    view = log.view()
    # The ids a run with `retry_failed` makes pending again (`CommitLog.uncommit(stage_failure)`).
    retried = pa.array([], pa.string())
    if cfg.stream.retry_failed:
        retried = view.only(stage_failed_parts(view.ids)).id_array()
    to_do = inputs - len(hits) + len(account.missing_ids) + int(pc.sum(pc.is_in(hits, value_set=retried)).as_py() or 0)
    settings = fingerprint.generate_settings(cfg)
    result = {
        "plan": "generate", "run_dir": cfg.run_dir, "out_dir": out_dir,
        "inputs": inputs, "committed": inputs - to_do,
        "committed_samples": account.ok_count, "committed_errors": account.errors,
        "to_do": to_do, "parts_to_write": math.ceil(to_do / cfg.stream.rows_per_file),
        "rows_per_file": cfg.stream.rows_per_file, "retry_failed": cfg.stream.retry_failed,
        "estimate": estimate(dict(account.seconds), account.rows, to_do, cfg),
        "made_by": {"settings_digest": fingerprint.digest_of(settings), "inputs_digest": listed.digest,
                    "source": cfg.data.source, "kind": cfg.data.kind, "limit": cfg.data.limit,
                    "models": "not hashed: a dry run fetches none", "recorded": _recorded(out_dir, settings),
                    "commit_log": {"parts": len(view.parts)}},
    }
    write_text(f"{RunLayout(cfg.run_dir).root}/{PLAN}", json.dumps(result, indent=2))
    return result


def print_plan(result: dict) -> None:
    recorded = result["made_by"]["recorded"]
    print(f"\nplan for {result['out_dir']}: {result['inputs']} inputs, {result['committed']} already committed "
          f"({result['committed_samples']} samples, {result['committed_errors']} errors), {result['to_do']} to do "
          f"in about {result['parts_to_write']} parts of {result['rows_per_file']} rows")
    if recorded["differs"]:
        print(f"a run would refuse this folder: {', '.join(recorded['differs'])} differ (restart=[generate] "
              "moves it aside)")
    est = result["estimate"]
    if est is None:
        print("no committed part yet: no rates to estimate from (a run with data.limit set measures them)")
    else:
        for stage, s in est["stages"].items():
            gpu = f", {s['gpu_h']:.2f} GPU-h" if s["gpus_per_actor"] else ""
            print(f"  {stage:<10} {s['s_per_row']:.4f} s/row -> {s['actor_s']:.0f} actor-s{gpu}")
        print(f"estimated for the rest: {est['actor_h']:.2f} actor-hours, {est['gpu_h']:.2f} GPU-hours "
              f"(at the rates of {est['from_rows']} committed rows)")
    print(f"plan written to {result['run_dir'].rstrip('/')}/{PLAN}; nothing else was written, no actor started")
