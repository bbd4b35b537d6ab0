"""Stable Diffusion inpainting, caption-guided and baseline (no text), paired per sample."""

from __future__ import annotations

import numpy as np
import torch

from blipinpaint.seeds import sample_seed


def composite(generated: np.ndarray, original: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Keep the known pixels: the VAE round trip alters them, and only the hole is inpainted."""
    return np.where(masks[..., None].astype(bool), generated, original)


# The generate step's two variants: output column -> the caption column that prompts it
# (None: the baseline, no text).
GENERATE_PROMPTS = {"inpainted": "caption", "inpainted_baseline": None}


class Inpainter:
    """Stage: `image`, `mask`, captions, `id` -> one uint8 inpainting per `prompts` entry, `noise_seed`.

    `prompts` maps each output column to the caption column that prompts it, or to None
    for the baseline. Every variant of a sample starts from the same noise (its own seed),
    so their difference is the caption's effect alone. The baseline's prompt is empty and
    its classifier-free guidance is off: with an empty prompt the guided and unguided noise
    predictions are the same, so guidance would double the UNet work for no change.
    """

    def __init__(self, pipe, num_inference_steps: int, guidance_scale: float, seed: int,
                 prompts: dict[str, str | None] | None = None):
        self.pipe = pipe
        self.steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.prompts = prompts or GENERATE_PROMPTS

    def _run(self, images: np.ndarray, masks: np.ndarray, prompts: list[str], seeds: list[int],
             guidance_scale: float) -> tuple[np.ndarray, np.ndarray]:
        """The composited uint8 inpaintings, and which rows came out NaN or infinite."""
        height, width = images.shape[1:3]
        # CPU generators: the same seed gives the same noise whatever device runs the UNet.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        out = self.pipe(
            prompt=prompts,
            image=images.astype(np.float32) / 255.0,
            mask_image=masks[..., None].astype(np.float32),
            height=height, width=width,
            num_inference_steps=self.steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
        ).images
        # Half precision can overflow in the UNet or the VAE; rint/clip/astype would turn the
        # NaN into a black or noisy image that nothing downstream could tell from a real one.
        broken = ~np.isfinite(out).all(axis=(1, 2, 3))
        generated = np.clip(np.rint(np.nan_to_num(out) * 255.0), 0, 255).astype(np.uint8)
        return composite(generated, images, masks), broken

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, masks = batch["image"], batch["mask"]
        seeds = [sample_seed(self.seed, str(i), "noise") for i in batch["id"]]
        out = {**batch, "noise_seed": np.array(seeds, dtype=np.int64)}
        errors = np.array(batch.get("error", [""] * len(seeds)), dtype=object)
        for column, caption in self.prompts.items():
            if caption is None:
                out[column], broken = self._run(images, masks, [""] * len(seeds), seeds, guidance_scale=1.0)
            else:
                prompts = [str(c) for c in batch[caption]]
                out[column], broken = self._run(images, masks, prompts, seeds, self.guidance_scale)
            for i in np.flatnonzero(broken & (errors == "")):
                errors[i] = f"inpainting failed: the {column} image has NaN or infinite values"
        out["error"] = errors  # such rows leave the stream as error rows (see `batches.Guarded`)
        return out
