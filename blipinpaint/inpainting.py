"""Stable Diffusion inpainting, caption-guided and baseline (no text), paired per sample."""

from __future__ import annotations

import copy

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
    so their difference is the caption's effect alone. With `caption_max_mask_area`, a sample
    whose mask hides more than that share of the image gets an empty prompt in every variant.

    All variants run in one denoising loop (`denoise`) with the pipeline's components, where
    calling the diffusers pipeline once per variant would VAE-encode the same masked image,
    prepare the same mask latents and run a UNet batch per variant per step. The baseline's
    prompt is empty and it gets no classifier-free guidance: with an empty prompt the guided
    and unguided noise predictions are the same, so guidance would double its UNet rows for
    no change.
    """

    def __init__(self, pipe, num_inference_steps: int, guidance_scale: float, seed: int,
                 prompts: dict[str, str | None] | None = None, caption_max_mask_area: float | None = None):
        self.pipe = pipe
        self.steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.prompts = prompts or GENERATE_PROMPTS
        self.caption_max_mask_area = caption_max_mask_area

    def with_prompts(self, prompts: dict[str, str | None]) -> Inpainter:
        """This stage with other `prompts`, on the same pipeline (its weights loaded once)."""
        twin = copy.copy(self)
        twin.prompts = prompts
        return twin

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
        generated = denoise(self.pipe, images, masks, texts, seeds, self.steps, self.guidance_scale)
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
