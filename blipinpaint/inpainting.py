"""Stable Diffusion inpainting, caption-guided and baseline (no text), paired per sample."""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch

from blipinpaint.seeds import sample_seed

log = logging.getLogger(__name__)


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
    so their difference is the caption's effect alone. With `caption_max_mask_area`, a sample
    whose mask hides more than that share of the image gets an empty prompt in every variant.

    All variants run in one denoising loop (`denoise`) with the pipeline's components, where
    calling the diffusers pipeline once per variant would VAE-encode the same masked image,
    prepare the same mask latents and run a UNet batch per variant per step. The baseline's
    prompt is empty and it gets no classifier-free guidance: with an empty prompt the guided
    and unguided noise predictions are the same, so guidance would double its UNet rows for
    no change.

    With `fixed_shape` = (rows, side), for a compiled UNet (`acceleration.compile_unet`),
    every loop runs on exactly `rows` images of `side`²: a smaller batch (the last one, a
    retry's remainder) is padded with copies of its last row, whose outputs are dropped, and
    a larger one runs in chunks. The UNet then sees one shape and compiles once, where each
    new batch size would compile it again (a minute or more on a GPU). The compile happens
    in `warm_up`, when the stage is built (and again for `with_prompts`' other rows), so
    that no batch's time, nor the rates computed from it, includes it.
    """

    def __init__(self, pipe, num_inference_steps: int, guidance_scale: float, seed: int,
                 prompts: dict[str, str | None] | None = None, caption_max_mask_area: float | None = None,
                 fixed_shape: tuple[int, int] | None = None):
        self.pipe = pipe
        self.steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.prompts = GENERATE_PROMPTS if prompts is None else prompts
        self.caption_max_mask_area = caption_max_mask_area
        self.fixed_shape = fixed_shape
        self.warmup_s = self.warm_up()

    def with_prompts(self, prompts: dict[str, str | None]) -> Inpainter:
        """This stage with other `prompts`, on the same pipeline (its weights loaded once)."""
        twin = copy.copy(self)
        twin.prompts = prompts
        twin.warmup_s = twin.warm_up()
        return twin

    def warm_up(self) -> float | None:
        """With a `fixed_shape`, run its blank padded batch through the loop (two steps: each
        UNet call has the shape and inputs of every later one) and log how long it took: the
        compile's cost, apart from the batches'. Its seconds, or None (nothing to warm up)."""
        if self.fixed_shape is None or not self.prompts:
            return None
        rows, side = self.fixed_shape
        images = np.zeros((1, side, side, 3), dtype=np.uint8)
        masks = np.zeros((1, side, side), dtype=np.uint8)
        masks[:, side // 4:3 * side // 4, side // 4:3 * side // 4] = 1
        texts = {column: None if caption is None else [""] for column, caption in self.prompts.items()}
        start = time.perf_counter()
        self._denoise(images, masks, texts, [0], min(self.steps, 2))
        seconds = time.perf_counter() - start
        # A warning so that it reaches the job's log: Ray workers pass on warnings and above only.
        log.warning("inpainter: compile warm-up on a batch of %d (%d variants, %dx%d) took %.1f s, left out of "
                    "the stage's rates", rows, len(self.prompts), side, side, seconds)
        return seconds

    def _denoise(self, images: np.ndarray, masks: np.ndarray, texts: dict[str, list[str] | None], seeds: list[int],
                 steps: int) -> dict[str, np.ndarray]:
        """`denoise`, in chunks of exactly `fixed_shape`'s rows when it is set (the padding's outputs dropped)."""
        if self.fixed_shape is None:
            return denoise(self.pipe, images, masks, texts, seeds, steps, self.guidance_scale)
        rows, chunks = self.fixed_shape[0], []
        for start in range(0, len(seeds), rows):
            real = min(rows, len(seeds) - start)
            index = list(range(start, start + real)) + [start + real - 1] * (rows - real)
            out = denoise(self.pipe, images[index], masks[index],
                          {c: None if t is None else [t[i] for i in index] for c, t in texts.items()},
                          [seeds[i] for i in index], steps, self.guidance_scale)
            chunks.append({column: images_out[:real] for column, images_out in out.items()})
        return {column: np.concatenate([c[column] for c in chunks]) for column in texts}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, masks = batch["image"], batch["mask"]
        seeds = [sample_seed(self.seed, str(i), "noise") for i in batch["id"]]
        out = {**batch, "noise_seed": np.array(seeds, dtype=np.int64)}
        errors = np.array(batch.get("error", [""] * len(seeds)), dtype=object)
        # `inpaint.caption_max_mask_area`: above it, the caption is left out (an empty prompt).
        uncaptioned = (np.zeros(len(seeds), dtype=bool) if self.caption_max_mask_area is None
                       else np.asarray(batch["mask_area"], dtype=np.float64) > self.caption_max_mask_area)
        texts = {column: None if caption is None else ["" if skip else str(c)
                                                       for c, skip in zip(batch[caption], uncaptioned)]
                 for column, caption in self.prompts.items()}
        generated = self._denoise(images, masks, texts, seeds, self.steps)
        for column, images_out in generated.items():
            # Half precision can overflow in the UNet or the VAE; rint/clip/astype would turn the
            # NaN into a black or noisy image that nothing downstream could tell from a real one.
            broken = ~np.isfinite(images_out).all(axis=(1, 2, 3))
            pixels = np.clip(np.rint(np.nan_to_num(images_out) * 255.0), 0, 255).astype(np.uint8)
            out[column] = composite(pixels, images, masks)
            for i in np.flatnonzero(broken & (errors == "")):
                errors[i] = f"inpainting failed: the {column} image has NaN or infinite values"
        out["error"] = errors  # such rows leave the stream as error rows (see `batches.Guarded`)
        return out


def _copy(generator: torch.Generator) -> torch.Generator:
    twin = torch.Generator(generator.device)
    twin.set_state(generator.get_state())
    return twin


@torch.no_grad()
def denoise(pipe, images: np.ndarray, masks: np.ndarray, prompts: dict[str, list[str] | None], seeds: list[int],
            steps: int, guidance_scale: float) -> dict[str, np.ndarray]:
    """Every variant of a batch in one denoising loop; {column: float images in [0, 1], NHWC}.

    What `StableDiffusionInpaintPipeline.__call__` does for one variant (strength 1, a
    9-channel inpainting UNet), through the same pipeline methods, for all variants at once:
    the prompts are encoded once (the empty prompt once for all), the noise and the masked
    image's latents are drawn once per sample from its seed (a CPU generator: the same noise
    on any device) and shared by every variant, and each step runs one UNet call over all
    rows: [empty, caption] rows per guided variant, one empty-prompt row per baseline. The
    scheduler steps every variant's latents together (its update is per row), each row with
    its own copy of its sample's generator, as the separate calls would. `tests/
    test_inpainting.py` checks the images against the pipeline's for each variant.
    """
    if pipe.unet.config.in_channels != 9:
        raise ValueError(f"the inpainter needs an inpainting UNet (9 input channels: latents, mask, masked image), "
                         f"this one has {pipe.unet.config.in_channels}")
    n, (height, width) = len(seeds), images.shape[1:3]
    device = pipe._execution_device
    cfg = guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None  # as the pipeline decides

    def encode(texts: list[str]) -> torch.Tensor:
        return pipe.encode_prompt(texts, device, 1, False)[0]

    empty = encode([""] * n)
    guided = {column: cfg and texts is not None for column, texts in prompts.items()}
    embeds, latent_of_row = [], []  # the UNet's rows: their text, and the variant whose latents they take
    for v, (column, texts) in enumerate(prompts.items()):
        rows = [empty, encode(texts)] if guided[column] else [encode(texts) if texts is not None else empty]
        embeds += rows
        latent_of_row += [v] * len(rows)
    embeds = torch.cat(embeds)
    dtype = embeds.dtype

    init = pipe.image_processor.preprocess(images.astype(np.float32) / 255.0, height=height, width=width)
    init = init.to(dtype=torch.float32)
    mask = pipe.mask_processor.preprocess(masks[..., None].astype(np.float32), height=height, width=width)
    pipe.scheduler.set_timesteps(steps, device=device)
    timesteps = pipe.scheduler.timesteps
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    (latents,) = pipe.prepare_latents(n, pipe.vae.config.latent_channels, height, width, dtype, device, generators,
                                      image=init, timestep=timesteps[:1].repeat(n), is_strength_max=True)
    mask, masked = pipe.prepare_mask_latents(mask, init * (mask < 0.5), n, height, width, dtype, device, generators,
                                             False)
    k = len(prompts)
    latents = latents.repeat(k, 1, 1, 1)  # variant-major: rows v*n .. (v+1)*n-1 are variant v
    step_kwargs = pipe.prepare_extra_step_kwargs(generators + [_copy(g) for _ in range(k - 1) for g in generators],
                                                 0.0)
    rows = torch.cat([torch.arange(v * n, (v + 1) * n, device=latents.device) for v in latent_of_row])
    condition = torch.cat([mask, masked], dim=1).repeat(len(latent_of_row), 1, 1, 1)
    for t in timesteps:
        x = pipe.scheduler.scale_model_input(latents[rows], t)
        predicted = pipe.unet(torch.cat([x, condition], dim=1), t, encoder_hidden_states=embeds,
                              return_dict=False)[0]
        noise, at = [], 0
        for column in prompts:
            if guided[column]:
                uncond, text = predicted[at:at + n], predicted[at + n:at + 2 * n]
                noise.append(uncond + guidance_scale * (text - uncond))
                at += 2 * n
            else:
                noise.append(predicted[at:at + n])
                at += n
        latents = pipe.scheduler.step(torch.cat(noise), t, latents, **step_kwargs, return_dict=False)[0]
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    out = pipe.image_processor.postprocess(decoded, output_type="np", do_denormalize=[True] * len(decoded))
    return {column: out[v * n:(v + 1) * n] for v, column in enumerate(prompts)}
