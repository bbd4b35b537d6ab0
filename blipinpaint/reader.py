"""Reading committed rows: by the commit markers, one read per part, never a listing or a scan.

The markers (`commit_log.CommitLog`) say which part holds which id, so a reader asks for the
rows it needs part by part. A read task here is `{"path": part, "ids": [...]}`; a batch
of them (`read_rows`) is what the Ray jobs hand to a CPU task each.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from blipinpaint import fingerprint
from blipinpaint.commit_log import CommitLog
from blipinpaint.commits import as_id_array
from blipinpaint.config import Config, heldout_fraction
from blipinpaint.errors import ConfigError, JobError
from blipinpaint.layout import Folder, RunLayout
from blipinpaint.seeds import raised_fraction_of, scores_below, split_scores
from blipinpaint.storage import filesystem

log = logging.getLogger(__name__)


def row_reads(out_dir: str, ids, parts: pa.Table | None = None) -> list[dict]:
    """Read tasks for the committed rows of `ids` (an Arrow array, or a collection) under
    `out_dir`: one per Parquet part that holds some, parts in name order, ids sorted. `parts`
    (`CommitLog.committed_samples`' table) saves reading the log again. Chosen in Arrow: the
    only Python objects per id are the tasks' own lists."""
    table = CommitLog(out_dir).committed_samples() if parts is None else parts
    chosen = table.filter(pc.is_in(table.column("id"), value_set=as_id_array(ids)))
    chosen = chosen.group_by(["part", "id"]).aggregate([])  # each (part, id) once
    chosen = chosen.sort_by([("part", "ascending"), ("id", "ascending")])
    names = pc.value_counts(chosen.column("part"))  # in the order first seen: the parts' sorted order
    reads, at, ids_chosen = [], 0, chosen.column("id")
    for name, n in zip(names.field("values").to_pylist(), names.field("counts").to_pylist()):
        reads.append({"path": f"{Folder(out_dir).samples}/{name}.parquet",
                      "ids": ids_chosen.slice(at, n).to_pylist()})
        at += n
    return reads


def read_rows(batch: dict, columns: list[str]) -> dict[str, np.ndarray]:
    """The rows of `ids` from each `path` (a batch of read tasks), as one batch of `columns`."""
    tables = []
    for path, ids in zip(batch["path"], batch["ids"]):
        fs, local = filesystem(str(path))
        tables.append(pq.read_table(local, filesystem=fs, columns=columns, filters=[("id", "in", list(ids))]))
    table = pa.concat_tables(tables)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


def read_part(read: dict, columns: list[str]) -> pa.Table:
    """The rows of one read task (`row_reads`) in its `ids`' order; an id its marker names but
    the part does not hold is an error naming both (the part was altered after its commit)."""
    fs, local = filesystem(str(read["path"]))
    ids = list(read["ids"])
    table = pq.read_table(local, filesystem=fs, columns=["id", *(c for c in columns if c != "id")],
                          filters=[("id", "in", ids)])
    at = {i: n for n, i in enumerate(table.column("id").to_pylist())}
    missing = [i for i in ids if i not in at]
    if missing or len(at) < table.num_rows:
        raise JobError(f"{read['path']} does not hold the rows its commit marker names ({len(missing)} of "
                       f"{len(ids)} missing, e.g. {missing[:3]}; {table.num_rows - len(at)} repeated): the part "
                       "was altered after it was committed")
    return table.take(pa.array([at[i] for i in ids], pa.int64())).select(columns)


def as_batch(reads: list[dict]) -> dict:
    """Read tasks as one `read_rows` batch."""
    return {"path": [r["path"] for r in reads], "ids": [r["ids"] for r in reads]}


def read_sorted(out_dir: str, ids: list[str], columns: list[str]) -> dict[str, np.ndarray]:
    """The committed rows of `ids` under `out_dir` (only the parts that hold them), sorted by id."""
    reads = row_reads(out_dir, ids)
    if not reads:
        return {c: np.array([], dtype=object) for c in ("id", *columns)}
    rows = read_rows(as_batch(reads), ["id", *columns])
    order = np.argsort(rows["id"])
    return {c: v[order] for c, v in rows.items()}


def committed_sample_ids(out_dir: str) -> list[str]:
    """The ids of the samples committed under `out_dir` (from its commit markers)."""
    return CommitLog(out_dir).committed_samples().column("id").to_pylist()


def split_reads(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(train, held-out) read tasks for generate's committed rows, split by a hash of each id:
    the same split in every job and rerun (`seeds.heldout`). The ids stay Arrow arrays; the
    hashes are taken a block of ids at a time, into one integer array."""
    generated, seed = RunLayout(cfg.run_dir).generate, cfg.seed
    # The rows' caption features came from one decoder layer: a scorer trained, or a decoder
    # fine-tuned, on another layer's features would learn from numbers it never sees.
    fingerprint.check(generated, {"scorer.feature_layer": cfg.scorer.feature_layer}, record=False)
    parts = CommitLog(generated).committed_samples()
    ids = pc.unique(parts.column("id")) if parts.num_rows else pa.array([], pa.string())
    scores = split_scores(seed, ids)
    fraction = raised_fraction_of(scores, heldout_fraction(cfg))
    held = scores_below(scores, fraction)
    n_held = int(held.sum())
    if n_held == len(ids):
        raise ConfigError(f"{len(ids)} generated samples, {n_held} of them held out (train.val_fraction, raised "
                          f"to {fraction:.3g} so that 2 are held out where 4 or more exist): none left to train on")
    log.info("split: %d samples to train on, %d held out (fraction %.3g)", len(ids) - n_held, n_held, fraction)
    held = pa.array(held, pa.bool_())
    return row_reads(generated, ids.filter(pc.invert(held)), parts), row_reads(generated, ids.filter(held), parts)


def read_errors(out_dir: str, ids=None, limit: int = 1000) -> tuple[list[dict], int]:
    """The committed error rows under `out_dir` (of `ids` only, if given): the first `limit`
    in commit order (parts in name order), and how many there are (counted from the log's
    id table: only the parts whose rows are returned are read)."""
    view = CommitLog(out_dir).view()
    failed = view.ids.filter(pc.is_valid(view.ids.column("error_kind")))
    if ids is not None:
        failed = failed.filter(pc.is_in(failed.column("id"), value_set=as_id_array(ids)))
    failed = pa.table({"part": failed.column("part").cast(pa.string()), "id": failed.column("id")})
    failed = failed.take(pc.sort_indices(failed, [("part", "ascending")]))  # stable: a part's ids in its order
    parts, rows, at = pc.value_counts(failed.column("part")), [], 0
    for name, n in zip(parts.field("values").to_pylist(), parts.field("counts").to_pylist()):
        if len(rows) >= limit:
            break
        fs, path = filesystem(f"{Folder(out_dir).errors}/{name}.parquet")
        table = pq.read_table(path, filesystem=fs, filters=[("id", "in", failed.column("id").slice(at, n).to_pylist())])
        rows += [{"id": r["id"], "source": r["source"], "reason": r["error"]} for r in table.to_pylist()]
        at += n
    return rows[:limit], failed.num_rows


# What ranking caption candidates reads back (`rayjobs.candidates`' rows).
CANDIDATE_COLUMNS = ["id", "image_id", "candidate", "caption", "mask_area", "ssim", "psnr", "clip_score"]


def read_candidates(out_dir: str, image_ids: set[str] | None = None) -> dict[str, np.ndarray]:
    """The committed candidate rows (`CANDIDATE_COLUMNS`), of the images `image_ids` only if given."""
    parts = CommitLog(out_dir).committed_samples()
    ids = parts.column("id")
    if image_ids is not None:  # a candidate's id is `<image id>#<k>`
        image = pc.replace_substring_regex(ids, pattern="#[^#]*$", replacement="", max_replacements=1)
        ids = ids.filter(pc.is_in(image, value_set=pa.array(sorted(image_ids), pa.string())))
    reads = row_reads(out_dir, ids, parts)
    if not reads:
        return {c: np.array([], dtype=object) for c in CANDIDATE_COLUMNS}
    return read_rows(as_batch(reads), CANDIDATE_COLUMNS)
