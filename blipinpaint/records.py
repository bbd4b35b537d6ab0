"""The rows the generate step writes: samples (one per usable input) and errors.

Images leave the pipeline as lossless PNG bytes, so later jobs (training, FID) read
exactly the pixels that were scored. `encode_rows` gives one Arrow table per batch with
every column (sample columns null on error rows); the writer splits it in two.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from blipinpaint.batches import Batch
from blipinpaint.io import decode_png, encode_png

METRICS = ("ssim", "psnr", "ssim_hole", "psnr_hole", "clip_score")
METRIC_COLUMNS = tuple(m + s for s in ("", "_baseline") for m in METRICS)
MODEL_ROLES = ("captioner", "inpainter", "clip")


def _png(*names: str) -> list[tuple[str, pa.DataType]]:
    """`<name>_png` binary columns: the image `<name>` (uint8 array, masks in {0, 1}) as PNG."""
    return [(f"{n}_png", pa.binary()) for n in names]


SAMPLE_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("caption", pa.string()),
     ("caption_features", pa.list_(pa.float32())), ("mask_kind", pa.string()), ("mask_area", pa.float32()),
     ("noise_seed", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
     # What the source carried with the image, as JSON (a WebDataset sample's `.txt`, `.json`), or "".
     ("annotations", pa.string())]
    + [(m, pa.float32()) for m in METRIC_COLUMNS]
    + _png("image", "mask", "inpainted", "inpainted_baseline")
    + [(f"{role}_model", pa.string()) for role in MODEL_ROLES]
)
# The evaluate step's rows: a held-out sample with the fine-tuned BLIP's caption, its
# inpainting (same noise seed) and metrics, next to the generate step's two variants.
EVAL_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("caption", pa.string()), ("caption_finetuned", pa.string()),
     ("caption_finetuned_features", pa.list_(pa.float32())), ("mask_area", pa.float32()), ("noise_seed", pa.int64())]
    + [(m + s, pa.float32()) for s in ("", "_baseline", "_finetuned") for m in METRICS]
    + _png("image", "mask", "inpainted", "inpainted_baseline", "inpainted_finetuned")
)
# With `caption.candidates` above 1: the scorer-reranked caption, its inpainting and metrics too.
RERANKED_SCHEMA = pa.schema(
    list(EVAL_SCHEMA) + [("caption_reranked", pa.string())] + [(m + "_reranked", pa.float32()) for m in METRICS]
    + _png("inpainted_reranked")
)
# The candidates step's rows (`rayjobs.candidates`): one per (training image, caption
# candidate), id `<image id>#<k>`. Candidate k of an image is inpainted from that image's
# noise seed (generate's), so candidates differ by their caption alone; no images are
# kept, only what ranking them by L_BLIP needs.
CANDIDATE_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("image_id", pa.string()), ("candidate", pa.int32()),
     ("caption", pa.string()), ("mask_area", pa.float32()), ("noise_seed", pa.int64())]
    + [(m, pa.float32()) for m in METRICS]
    + [(f"{role}_model", pa.string()) for role in MODEL_ROLES]
)
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("error", pa.string())])


def _column(values: list, ok: np.ndarray, type_: pa.DataType) -> pa.Array:
    """Values for the good rows, null elsewhere."""
    it = iter(values)
    return pa.array([next(it) if good else None for good in ok], type=type_)


def encode_rows(batch: Batch, models: dict[str, str], schema: pa.Schema = SAMPLE_SCHEMA) -> pa.Table:
    """Stage: a finished batch -> one Arrow table: `schema`'s columns, `error`, `seconds_*`, `retries_*`, `reruns_*`.

    `models` maps each role to the checkpoint it ran (recorded on every sample). A PNG
    column already in the batch (read from earlier output) is kept as it is.
    """
    ok = np.array([not e for e in batch["error"]], dtype=bool)
    n_ok = int(ok.sum())
    columns: dict[str, pa.Array] = {
        "id": pa.array([str(i) for i in batch["id"]], pa.string()),
        "source": pa.array([str(s) for s in batch["source"]], pa.string()),
    }
    for field in schema:
        name = field.name
        if name in columns:
            continue
        if not n_ok:  # an all-error batch skipped every model stage: no such columns
            values = []
        elif name.endswith("_features"):
            values = [row.astype(np.float32).tolist() for row in np.asarray(batch[name])[ok]]
        elif name.endswith("_png") and name in batch:
            values = [bytes(b) for b in np.asarray(batch[name])[ok]]
        elif name.endswith("_png"):
            source = name[: -len("_png")]
            scale = 255 if source == "mask" else 1  # masks travel as {0, 1}, stored as black/white
            values = [encode_png((img * scale).astype(np.uint8)) for img in np.asarray(batch[source])[ok]]
        elif name.endswith("_model"):
            values = [models[name[: -len("_model")]]] * n_ok
        else:
            values = np.asarray(batch[name])[ok].tolist()
        columns[name] = _column(values, ok, field.type)
    columns["error"] = pa.array([str(e) for e in batch["error"]], pa.string())
    for key in batch:
        if key.startswith("seconds_"):
            columns[key] = pa.array(np.asarray(batch[key], dtype=np.float64))
        elif key.startswith(("retries_", "reruns_")):
            columns[key] = pa.array(np.asarray(batch[key], dtype=np.int64))
    return pa.table(columns)


def decode_images(rows: Batch) -> Batch:
    """`rows` read back with their ground truth and mask as arrays again: `image` (uint8 HWC)
    and `mask` ({0, 1}) from `image_png` and `mask_png`."""
    return {**rows, "image": np.stack([decode_png(b) for b in rows["image_png"]]),
            "mask": np.stack([(decode_png(b) > 127).astype(np.uint8) for b in rows["mask_png"]])}


def split_rows(table: pa.Table, schema: pa.Schema = SAMPLE_SCHEMA) -> tuple[pa.Table, pa.Table]:
    """A table from `encode_rows` -> (samples, errors) in their written schemas."""
    failed = np.array([bool(e) for e in table.column("error").to_pylist()], dtype=bool)
    samples = table.filter(pa.array(~failed)).select(schema.names).cast(schema)
    errors = table.filter(pa.array(failed)).select(ERROR_SCHEMA.names).cast(ERROR_SCHEMA)
    return samples, errors
