"""Inpainting masks: the paper's random box and LaMa-style irregular strokes.

Every mask is drawn from its own generator seeded by (seed, sample id), so a sample's
mask never depends on which batch, worker or retry produced it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from blipinpaint.seeds import sample_rng

MASK_KINDS = ("box", "thin", "medium", "thick")
MASK_MODES = MASK_KINDS + ("mixed",)  # mixed: one kind per sample, drawn from its seed

# The paper masks a 200x200 box in a 512x512 image; other sizes scale it.
BOX_FRACTION = 200 / 512


@dataclass(frozen=True)
class StrokeParams:
    """LaMa's irregular-mask settings at 256x256 (its thin/medium/thick configs)."""

    min_times: int
    max_times: int
    max_len: int
    max_width: int
    max_angle: int = 4


STROKES = {
    "thin": StrokeParams(min_times=4, max_times=50, max_len=40, max_width=10),
    "medium": StrokeParams(min_times=1, max_times=5, max_len=100, max_width=50),
    "thick": StrokeParams(min_times=1, max_times=5, max_len=200, max_width=100),
}


def box_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    side = max(1, round(size * BOX_FRACTION))
    top, left = rng.integers(0, size - side + 1, size=2)
    mask = np.zeros((size, size), dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def stroke_mask(size: int, params: StrokeParams, rng: np.random.Generator) -> np.ndarray:
    """Random polylines of random width, as LaMa's `make_random_irregular_mask`."""
    scale = size / 256
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in range(int(rng.integers(params.min_times, params.max_times + 1))):
        x, y = rng.uniform(0, size, size=2)
        for _ in range(1 + int(rng.integers(5))):
            angle = 0.01 + rng.integers(params.max_angle)
            if stroke % 2 == 0:
                angle = 2 * np.pi - angle
            length = (10 + rng.integers(params.max_len)) * scale
            width = max(1, round((5 + rng.integers(params.max_width)) * scale))
            nx = float(np.clip(x + length * np.sin(angle), 0, size - 1))
            ny = float(np.clip(y + length * np.cos(angle), 0, size - 1))
            draw.line([(x, y), (nx, ny)], fill=255, width=width)
            r = width / 2  # round joints, so consecutive segments leave no notches
            draw.ellipse([nx - r, ny - r, nx + r, ny + r], fill=255)
            x, y = nx, ny
    return np.asarray(canvas) > 0


def make_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "box":
        return box_mask(size, rng)
    if kind in STROKES:
        return stroke_mask(size, STROKES[kind], rng)
    raise ValueError(f"unknown mask kind {kind!r}; choose one of {list(MASK_KINDS)}")


def masked_pixels(images: np.ndarray, masks: np.ndarray, fill: int = 127) -> np.ndarray:
    """Images with the hidden pixels replaced by gray: all the captioner may see.

    Gray is what SD's inpainting input shows in the hole too (0 in its [-1, 1] range).
    """
    out = images.copy()
    out[masks.astype(bool)] = fill
    return out


class MaskGenerator:
    """Stage: `id` -> `mask` (B, size, size) uint8 {0, 1}, `mask_kind`, `mask_area` (fraction hidden)."""

    def __init__(self, mode: str, size: int, seed: int):
        if mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {mode!r}; choose one of {list(MASK_MODES)}")
        self.mode, self.size, self.seed = mode, size, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        masks = np.zeros((n, self.size, self.size), dtype=np.uint8)
        kinds = np.empty(n, dtype=object)
        for i, sample_id in enumerate(batch["id"]):
            rng = sample_rng(self.seed, str(sample_id), "mask")
            kinds[i] = MASK_KINDS[rng.integers(len(MASK_KINDS))] if self.mode == "mixed" else self.mode
            masks[i] = make_mask(kinds[i], self.size, rng)
        return {**batch, "mask": masks, "mask_kind": kinds,
                "mask_area": masks.reshape(n, self.size * self.size).mean(axis=1).astype(np.float32)}
