"""GPU throughput: SD inpainting in a bare diffusers loop and through a Ray actor pool, BLIP
captions/s, and the UNet's achieved TFLOP/s against the GPU's measured fp16 peak.

    .venv/bin/python bench/gpu_inpaint.py [--images 48] [--batch-sizes 1 2 4 8 16] [--compile]
    .venv/bin/python bench/gpu_inpaint.py --smoke     # the same code on CPU, tiny models, in seconds

Defaults are the paper's work on one GPU: the `fullsize` preset (SD 1.5 inpaint, BLIP base,
random weights built offline: no download), 512x512, 50 steps, classifier-free guidance
7.5, fp16. All in one run, on the same masked images:
- peak: the fp16 matmul TFLOP/s this GPU reaches (8192^3 GEMMs), the ceiling for the UNet;
- bare loop: `pipe(...)` over the images, batch by batch, for each batch size;
- both variants (what generate makes of each image: caption-guided and baseline), per batch
  size: the pipeline called once per variant (the stage before the fused loop, and the
  authors' flow) against the fused loop (`inpainting.denoise`: one UNet call of 3 rows per
  image per step);
- Ray: the project's `Inpainter` stage in a 1-GPU Ray Data actor pool at the best batch
  size of the bare loop, rows streamed from the driver: the overhead of Ray against the loop;
- UNet FLOPs per image (counted by torch's FLOP counter on one step), hence TFLOP/s achieved;
- BLIP: captions/s of the `Captioner` stage per batch size.
Rates are steady state: the first batch (CUDA start, kernel selection, compilation) is
left out of every timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from blipinpaint import builders  # noqa: E402
from blipinpaint.acceleration import compile_unet  # noqa: E402
from blipinpaint.config import load_config, sample_images_dir  # noqa: E402
from blipinpaint.inpainting import denoise  # noqa: E402
from blipinpaint.source_reads import read_files  # noqa: E402
from blipinpaint.sources import items_to_batch, list_folder  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """Dense matmul TFLOP/s: what the tensor cores give this dtype (the UNet is mostly GEMMs)."""
    if device.type != "cuda":
        n, reps = 512, 3
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def masked_images(cfg, n: int) -> dict[str, np.ndarray]:
    """`n` decoded, masked images (the shipped photographs repeated) with a caption each."""
    items = list_folder(str(sample_images_dir()))
    items = [{**items[i % len(items)], "id": f"b{i:05d}"} for i in range(n)]
    batch = builders.build_masker(cfg)(builders.build_decoder(cfg)(read_files(items_to_batch(items))))
    batch["caption"] = np.array(["a photograph of a street with people and a car"] * n, dtype=object)
    return batch


def unet_tflop_per_image(pipe, size: int, steps: int, guided: bool) -> float:
    """UNet TFLOP to inpaint one image: one counted step, times steps (x2 rows with guidance)."""
    unet = pipe.unet
    latent = size // pipe.vae_scale_factor
    rows = 2 if guided else 1
    sample = torch.randn(rows, unet.config.in_channels, latent, latent, device=unet.device, dtype=unet.dtype)
    text = torch.randn(rows, 77, unet.config.cross_attention_dim, device=unet.device, dtype=unet.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(500, device=unet.device), encoder_hidden_states=text)
    return counter.get_total_flops() * steps / 1e12


def rate(n_batches: int, batch_size: int, run_batch) -> tuple[float, list[float]]:
    """Images/s over all batches but the first (warm-up); `run_batch(i)` runs batch i to completion."""
    times = []
    for i in range(n_batches):
        start = time.perf_counter()
        run_batch(i)
        times.append(time.perf_counter() - start)
    steady = times[1:] or times
    return batch_size * len(steady) / sum(steady), times


def bare_loop(pipe, batch, b: int, steps: int, guidance: float, device) -> float:
    """Images/s of `pipe(...)` called directly, `b` images a call: what a simple script does."""
    n = len(batch["id"]) // b

    def run(i):
        s = slice(i * b, (i + 1) * b)
        pipe(prompt=list(batch["caption"][s]), image=batch["image"][s].astype(np.float32) / 255.0,
             mask_image=batch["mask"][s][..., None].astype(np.float32), height=batch["image"].shape[1],
             width=batch["image"].shape[2], num_inference_steps=steps, guidance_scale=guidance, output_type="np")
        sync(device)

    return rate(n, b, run)[0]


def both_variants(pipe, batch, b: int, steps: int, guidance: float, device, fused: bool) -> float:
    """Images/s with both of generate's variants made of each (guided and baseline, the same
    noise): `pipe(...)` once per variant, or the fused loop (`inpainting.denoise`)."""
    n = len(batch["id"]) // b

    def run(i):
        s = slice(i * b, (i + 1) * b)
        seeds = list(range(i * b, (i + 1) * b))
        if fused:
            denoise(pipe, batch["image"][s], batch["mask"][s], {"guided": list(batch["caption"][s]), "baseline": None},
                    seeds, steps, guidance)
        else:
            for prompts, scale in ((list(batch["caption"][s]), guidance), ([""] * b, 1.0)):
                pipe(prompt=prompts, image=batch["image"][s].astype(np.float32) / 255.0,
                     mask_image=batch["mask"][s][..., None].astype(np.float32), height=batch["image"].shape[1],
                     width=batch["image"].shape[2], num_inference_steps=steps, guidance_scale=scale,
                     generator=[torch.Generator("cpu").manual_seed(x) for x in seeds], output_type="np")
        sync(device)

    return rate(n, b, run)[0]


class GuidedInpaint:
    """A Ray actor: the project's Inpainter stage, caption-guided only (the bare loop's work)."""

    def __init__(self, cfg):
        self.stage = builders.build_inpainter(cfg, prompts={"inpainted": "caption"})

    def __call__(self, batch):
        out = self.stage(batch)
        return {"id": out["id"], "done": np.full(len(out["id"]), time.time())}


def ray_pool(cfg, batch, b: int, use_gpu: bool) -> float:
    """Images/s through a 1-GPU Ray Data actor pool, timed from the first batch out to the last."""
    import ray

    from rayjobs.cluster import connect

    connect()
    rows = [{k: batch[k][i] for k in ("id", "image", "mask", "caption")} for i in range(len(batch["id"]))]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // b)).map_batches(
        GuidedInpaint, fn_constructor_kwargs={"cfg": cfg}, batch_size=b, num_gpus=1 if use_gpu else None,
        num_cpus=1, compute=ray.data.ActorPoolStrategy(size=1))
    done = np.sort(np.concatenate([r["done"] for r in ds.iter_batches(batch_size=None, batch_format="numpy")]))
    if len(done) != len(rows):
        raise RuntimeError(f"the Ray pool returned {len(done)} of {len(rows)} images")
    first = done[b - 1]  # the first batch's rows include the actor's start and model load
    return (len(done) - b) / (done[-1] - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (bare loop)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: checks the script, not the GPU")
    parser.add_argument("--out", default="bench/results/gpu_inpaint.json")
    args = parser.parse_args()
    if args.smoke:
        overrides = ["models.preset=tiny", "models.device=cpu", "models.dtype=fp32"]
        args.images, args.batch_sizes, args.steps = 4, [1, 2], 2
    else:
        overrides = ["models.preset=fullsize", "models.device=cuda", "models.dtype=fp16", "data.image_size=512"]
    cfg = load_config(overrides=[*overrides, f"inpaint.num_inference_steps={args.steps}"])
    device = torch.device(cfg.models.device)
    dtype = torch.float16 if cfg.models.dtype == "fp16" else torch.float32
    guidance = cfg.inpaint.guidance_scale
    batch = masked_images(cfg, args.images)
    size = batch["image"].shape[1]

    flags = [f for f, on in (("--smoke", args.smoke), ("--compile", args.compile)) if on]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {"command": " ".join(["bench/gpu_inpaint.py", *flags]), "machine": f"{gpu}, torch {torch.__version__}",
              "date": date.today().isoformat(),
              "preset": cfg.models.preset, "dtype": cfg.models.dtype, "size": size, "steps": args.steps,
              "guidance": guidance, "images": args.images}
    result["peak_tflops"] = float(f"{peak_tflops(device, dtype):.3g}")
    print(f"peak {cfg.models.dtype} matmul: {result['peak_tflops']} TFLOP/s")

    inpainter = builders.build_inpainter(cfg)  # on CUDA: channels-last UNet and VAE, as the job runs them
    pipe = inpainter.pipe
    if args.compile:  # as `inpaint.compile` does, but compiled again for each batch size (its first batch, untimed)
        compile_unet(pipe, "max-autotune-no-cudagraphs")
    tflop = unet_tflop_per_image(pipe, size, args.steps, guided=True)
    result["unet_tflop_per_image"] = float(f"{tflop:.3g}")
    result["bare"] = {}
    with torch.inference_mode():
        for b in args.batch_sizes:
            if b > args.images:
                continue
            r = bare_loop(pipe, batch, b, args.steps, guidance, device)
            result["bare"][b] = {"images_per_s": round(r, 3), "unet_tflops": float(f"{r * tflop:.3g}"),
                                 "of_peak": round(r * tflop / result["peak_tflops"], 3)}
            print(f"bare loop, batch {b:>2}: {r:.3f} img/s, UNet {r * tflop:.3g} TFLOP/s "
                  f"({100 * r * tflop / result['peak_tflops']:.0f}% of peak)")
            per_variant = both_variants(pipe, batch, b, args.steps, guidance, device, fused=False)
            fused = both_variants(pipe, batch, b, args.steps, guidance, device, fused=True)
            result["both_variants"] = {**result.get("both_variants", {}), b: {
                "pipeline_per_variant_images_per_s": round(per_variant, 3), "fused_images_per_s": round(fused, 3),
                "fused_speedup": round(fused / per_variant, 3),
                "fused_unet_of_peak": round(fused * 1.5 * tflop / result["peak_tflops"], 3)}}
            print(f"both variants, batch {b:>2}: pipeline per variant {per_variant:.3f} img/s, fused {fused:.3f} img/s "
                  f"({fused / per_variant:.2f}x)")
    best = max(result["bare"], key=lambda k: result["bare"][k]["images_per_s"])
    del inpainter, pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()

    r = ray_pool(cfg, batch, best, device.type == "cuda")
    bare = result["bare"][best]["images_per_s"]
    result["ray"] = {"batch_size": best, "images_per_s": round(r, 3), "overhead": round(1 - r / bare, 3)}
    print(f"Ray actor pool, batch {best}: {r:.3f} img/s, {100 * (1 - r / bare):+.1f}% overhead against the bare loop")

    captioner = builders.build_captioner(cfg)
    result["blip"] = {}
    for b in args.batch_sizes:
        if b > args.images:
            continue

        def run(i, b=b):
            s = slice(i * b, (i + 1) * b)
            captioner({"image": batch["image"][s], "mask": batch["mask"][s]})
            sync(device)

        c = rate(args.images // b, b, run)[0]
        result["blip"][b] = {"captions_per_s": round(c, 2)}
        print(f"BLIP captions, batch {b:>2}: {c:.2f}/s")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
