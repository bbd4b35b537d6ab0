"""Checking that a run's rows are what its settings and models make: recompute a sample of
them through generate's stages and compare, value by value.

Every random choice of a row derives from (seed, id) and its models are pinned by content,
so a committed row can be made again from its input alone. What differs then says what
changed: a library or a kernel (small differences, within the precision's tolerance), a
part altered after its commit, an input replaced at its source (the ground truth differs),
a model store that holds other bytes (caught before recomputing, by digest).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from blipinpaint import builders
from blipinpaint.batches import Batch, take
from blipinpaint.config import Config
from blipinpaint.io import decode_png
from blipinpaint.records import METRIC_COLUMNS
from blipinpaint.seeds import sample_seed
from blipinpaint.source_reads import read_files
from blipinpaint.sources import items_to_batch

# The largest difference taken as equal, per precision: inpainted pixels in 8-bit levels, and
# scores and caption features in their own units. The stages are deterministic on a CPU; a
# recompute in another process, thread count or batch still sums in another order, which in
# fp32 moves a pixel across a rounding step (1 level, measured) and a score by ~1e-5. Half
# precision keeps 8 (bf16) or 11 (fp16) bits of mantissa: a few levels, and 1e-2 on scores.
TOLERANCES = {"fp32": {"image": 1, "score": 1e-4}, "bf16": {"image": 8, "score": 5e-2},
              "fp16": {"image": 8, "score": 5e-2}}
STAGES = {"captioner": builders.build_captioner, "inpainter": builders.build_inpainter,
          "metrics": builders.build_metrics}
# What the audit reads of a committed row to compare (`records.SAMPLE_SCHEMA`).
RECORDED_COLUMNS = ["caption", "caption_features", "mask_kind", "mask_area", "noise_seed", "width", "height",
                    "image_png", "mask_png", "inpainted_png", "inpainted_baseline_png", *METRIC_COLUMNS,
                    "captioner_model", "inpainter_model", "clip_model"]
EXACT = ("caption", "mask_kind", "noise_seed", "width", "height")  # no arithmetic between the input and these
INPUT_IMAGES = ("image", "mask")  # decoded, resized and masked: integer work, exact
MODEL_IMAGES = ("inpainted", "inpainted_baseline")
SCORES = (*METRIC_COLUMNS, "mask_area")


def choose(ids: list[str], size: int, seed: int) -> list[str]:
    """`size` of `ids` (all, if fewer) by a hash order of (seed, id): a random sample that the
    same settings choose again, whatever the order the ids come in. Sorted."""
    return sorted(sorted(set(ids), key=lambda i: sample_seed(seed, i, "audit"))[:size])


def tolerances(cfg: Config) -> dict[str, float]:
    """`audit.image_tolerance` and `audit.score_tolerance`, else the precision's (`TOLERANCES`)."""
    default = TOLERANCES[cfg.models.dtype]
    return {"image": default["image"] if cfg.audit.image_tolerance is None else cfg.audit.image_tolerance,
            "score": default["score"] if cfg.audit.score_tolerance is None else cfg.audit.score_tolerance}


def _stage(name: str, stage, rows: Batch, batch_size: int) -> Batch:
    """`stage` over `rows` in batches of `batch_size` (generate's), the outputs joined again."""
    parts = [stage(take(rows, slice(at, at + batch_size))) for at in range(0, len(rows["id"]), batch_size)]
    return {key: np.concatenate([np.asarray(p[key]) for p in parts]) for key in parts[0]}


def recompute(cfg: Config, items: list[dict]) -> tuple[Batch, dict[str, str]]:
    """The listed inputs `items` through generate's stages, built from `cfg` as generate builds
    them (read + decode + mask, captioner, inpainter, metrics), in batches of generate's sizes.
    Returns (the rows that came through, {id: error} of those that did not)."""
    read = functools.partial(read_files, max_mb=cfg.data.max_file_mb, image_column=cfg.data.image_column)
    rows = builders.build_masker(cfg)(builders.build_decoder(cfg)(read(items_to_batch(items))))
    errors: dict[str, str] = {}

    def keep_good(batch: Batch) -> Batch:
        bad = np.array([bool(e) for e in batch["error"]], dtype=bool)
        errors.update({str(i): str(e) for i, e in zip(batch["id"][bad], batch["error"][bad])})
        return take(batch, ~bad)

    rows = keep_good(rows)
    for name, build in STAGES.items():
        if not len(rows["id"]):
            break
        try:
            rows = keep_good(_stage(name, build(cfg), rows, getattr(cfg.stream, name).batch_size))
        except Exception as err:  # noqa: BLE001 - a stage that fails here is a finding, not a crash
            errors.update({str(i): f"stage failed: {name} raised {type(err).__name__}: {err}" for i in rows["id"]})
            rows = take(rows, np.zeros(len(rows["id"]), dtype=bool))
    return rows, errors


def _plain(value):
    """A numpy scalar as the Python value it holds (compared and shown as such)."""
    return value.item() if isinstance(value, np.generic) else value


def _score_diff(a: float, b: float) -> float:
    """|a - b|, where two equal non-finite values (an infinite PSNR) differ by 0 and a finite
    and a non-finite one by infinity."""
    if math.isnan(a) and math.isnan(b) or (math.isinf(a) and a == b):
        return 0.0
    return abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf


def _image_check(name: str, recorded: bytes, recomputed: np.ndarray, tolerance: float, notes: list[str]) -> dict:
    before = decode_png(recorded).astype(np.int16)
    after = (recomputed * (255 if name == "mask" else 1)).astype(np.int16)
    if before.shape != after.shape:
        notes.append(f"{name}: {before.shape} recorded, {after.shape} recomputed")
        return {"equal": False, "max_diff": None, "tolerance": tolerance}
    diff = np.abs(before - after)
    per_pixel = diff.max(axis=-1) if diff.ndim == 3 else diff
    worst, count = int(diff.max(initial=0)), int((per_pixel > 0).sum())
    if worst > tolerance:
        notes.append(f"{name}: {count} pixels differ, by up to {worst} levels (tolerance {tolerance:g})")
    return {"equal": worst <= tolerance, "max_diff": worst, "pixels_differing": count, "tolerance": tolerance}


def _scores_check(recorded: dict, recomputed: dict, i: int, tolerance: float, notes: list[str]) -> dict:
    diffs = {m: _score_diff(float(recorded[m]), float(recomputed[m][i])) for m in SCORES}
    worst = max(diffs, key=diffs.get)
    for m, d in diffs.items():
        if d > tolerance:
            notes.append(f"{m}: {float(recorded[m]):.6g} recorded, {float(recomputed[m][i]):.6g} recomputed "
                         f"(differs by {d:.3g}, tolerance {tolerance:g})")
    return {"equal": diffs[worst] <= tolerance, "max_diff": diffs[worst], "worst": worst, "tolerance": tolerance}


def compare_row(recorded: dict, recomputed: Batch, i: int, models: dict[str, str], tol: dict[str, float]) -> dict:
    """One committed row (`recorded`: `RECORDED_COLUMNS`) against row `i` of `recomputed`: a
    check per kind of value, and a line per difference naming the value and by how much."""
    notes: list[str] = []
    checks = {}
    for column in EXACT:
        before, after = _plain(recorded[column]), _plain(recomputed[column][i])
        checks[column] = {"equal": before == after}
        if before != after:
            notes.append(f"{column}: {before!r} recorded, {after!r} recomputed")
    for role, checkpoint in models.items():  # the checkpoint the row names is the one configured
        equal = recorded[f"{role}_model"] == checkpoint
        checks[f"{role}_model"] = {"equal": equal}
        if not equal:
            notes.append(f"{role}_model: {recorded[f'{role}_model']!r} recorded, {checkpoint!r} configured")
    for name in (*INPUT_IMAGES, *MODEL_IMAGES):
        limit = tol["image"] if name in MODEL_IMAGES else 0
        checks[name] = _image_check(name, recorded[f"{name}_png"], recomputed[name][i], limit, notes)
    checks["scores"] = _scores_check(recorded, recomputed, i, tol["score"], notes)
    features = np.asarray(recorded["caption_features"], dtype=np.float32)
    again = np.asarray(recomputed["caption_features"][i], dtype=np.float32)
    if features.shape != again.shape:
        notes.append(f"caption_features: {features.shape} recorded, {again.shape} recomputed")
        checks["caption_features"] = {"equal": False, "max_diff": None, "tolerance": tol["score"]}
    else:
        worst = float(np.abs(features - again).max(initial=0.0))
        checks["caption_features"] = {"equal": worst <= tol["score"], "max_diff": worst, "tolerance": tol["score"]}
        if worst > tol["score"]:
            notes.append(f"caption_features: differ by up to {worst:.3g} (tolerance {tol['score']:g})")
    return {"held": not notes, "checks": checks, "differs": notes}


def compare(ids: list[str], recorded: dict[str, np.ndarray], recomputed: Batch, errors: dict[str, str],
            models: dict[str, str], tol: dict[str, float]) -> list[dict]:
    """Each of the committed rows `ids`, as read (`recorded`: columns) against its recomputation:
    a report per row, {id, held, checks, differs}. A row its part no longer holds fails."""
    read = {str(i): n for n, i in enumerate(recorded["id"])}
    at = {str(i): n for n, i in enumerate(recomputed["id"])}
    rows = []
    for sample_id in ids:
        if sample_id not in read:
            rows.append({"id": sample_id, "held": False, "checks": {},
                         "differs": ["the part its commit marker names does not hold it (altered after its commit)"]})
        elif sample_id in at:
            row = {c: v[read[sample_id]] for c, v in recorded.items()}
            rows.append({"id": sample_id, **compare_row(row, recomputed, at[sample_id], models, tol)})
        else:
            reason = errors.get(sample_id, "not recomputed")
            rows.append({"id": sample_id, "held": False, "checks": {},
                         "differs": [f"recomputing failed: {reason} (the run committed it as a sample)"]})
    return rows


def summary(rows: list[dict]) -> dict:
    """The audit's total: rows held, the rows that did not, the largest difference per check."""
    largest: dict[str, float] = {}
    for row in rows:
        for name, check in row["checks"].items():
            if check.get("max_diff") is not None:
                largest[name] = max(largest.get(name, 0), check["max_diff"])
    failed = [r["id"] for r in rows if not r["held"]]
    return {"rows": len(rows), "held": len(rows) - len(failed), "failed": failed, "max_diff": largest,
            "verdict": "held" if not failed else "did not hold"}
