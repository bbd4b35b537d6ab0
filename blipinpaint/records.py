"""The rows the generate step writes: samples (one per usable input) and errors.

Images leave the pipeline as lossless PNG bytes, so later jobs (training, FID) read
exactly the pixels that were scored.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from blipinpaint.io import encode_png

METRICS = ("ssim", "psnr", "ssim_hole", "psnr_hole", "clip_score")
METRIC_COLUMNS = tuple(m + s for s in ("", "_baseline") for m in METRICS)
IMAGE_COLUMNS = {"image": "image_png", "mask": "mask_png", "inpainted": "inpainted_png",
                 "inpainted_baseline": "inpainted_baseline_png"}

ERROR_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("error", pa.string())])


class SampleEncoder:
    """Stage: finished batch -> sample rows (arrays to PNG, features as float32 lists)."""

    def __init__(self, models: dict[str, str]):
        self.models = models  # role -> checkpoint id or folder, recorded on every row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        out = {
            "id": batch["id"], "source": batch["source"], "caption": batch["caption"],
            "caption_features": list(np.asarray(batch["caption_features"], dtype=np.float32)),
            "mask_kind": batch["mask_kind"], "mask_area": batch["mask_area"], "noise_seed": batch["noise_seed"],
            "width": batch["width"], "height": batch["height"],
        }
        out.update({m: batch[m] for m in METRIC_COLUMNS})
        for column, png_column in IMAGE_COLUMNS.items():
            images = batch[column] * 255 if column == "mask" else batch[column]
            out[png_column] = np.array([encode_png(img.astype(np.uint8)) for img in images], dtype=object)
        for role, ref in self.models.items():
            out[f"{role}_model"] = np.array([ref] * n, dtype=object)
        return out


def error_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The error table's columns for rows whose `error` is set."""
    bad = np.array([bool(e) for e in batch["error"]], dtype=bool)
    return {"id": np.asarray(batch["id"])[bad], "source": np.asarray(batch["source"])[bad],
            "error": np.asarray(batch["error"])[bad]}
