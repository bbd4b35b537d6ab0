"""The whole GPU measurement in one process (bench/gpu_bench.sh runs it; see there for what
each section measures). Every section records its own wall seconds, so a first run on a GPU
also tells how to size the next.

    bash bench/gpu_bench.sh [--images 24] [--batch-sizes 4 8] [--job-images 32] [--out FILE]
    bash bench/gpu_bench.sh --smoke      # the same code on CPU with the tiny models

With `--smoke` the sizes are tiny and the compiled section runs its code on the eager UNet
(inductor's build of every kernel takes a minute or more on 2 cores; `tests/
test_acceleration.py` covers the compiled UNet itself); fp16 steps are skipped without CUDA.
The generate section joins $RAY_ADDRESS's Ray when it is set, else starts a local one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_inpaint  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from blipinpaint import builders  # noqa: E402
from blipinpaint.acceleration import compile_unet  # noqa: E402
from blipinpaint.config import load_config, sample_images_dir  # noqa: E402
from blipinpaint.inpainting import denoise  # noqa: E402

SECTIONS = ("environment", "inpaint", "generate", "finetune")


def versions() -> dict:
    """Installed versions, read from the packages' metadata (importing deepspeed alone takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for package in ("diffusers", "transformers", "ray", "deepspeed", "accelerate"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def environment() -> dict:
    """The machine: GPUs as nvidia-smi names them (driver, memory), CPUs, library versions."""
    out = {"cpus": os.cpu_count(), "platform": platform.platform(), **versions(), "gpus": []}
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,power.limit,clocks.max.sm"
        lines = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.strip().splitlines()
        out["gpus"] = [dict(zip(query.split(","), (v.strip() for v in line.split(",")))) for line in lines]
    return out


class GpuSampler:
    """nvidia-smi's utilisation and memory of GPU 0 every `period_ms`, while the block runs."""

    def __init__(self, period_ms: int = 500):
        self.period_ms, self.process, self.lines = period_ms, None, []

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 f"--loop-ms={self.period_ms}"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            self.lines = self.process.communicate(timeout=30)[0].strip().splitlines()

    def summary(self) -> dict:
        if self.process is None:
            return {"samples": 0, "note": "no nvidia-smi on this machine"}
        values = np.array([[float(v) for v in line.split(",")] for line in self.lines if line.strip()])
        if not len(values):
            return {"samples": 0}
        util = values[:, 0]
        return {"samples": len(values), "period_ms": self.period_ms, "util_mean": round(float(util.mean()), 1),
                "util_median": float(np.median(util)), "share_above_90": round(float((util > 90).mean()), 3),
                "memory_max_mib": float(values[:, 1].max())}


def inpaint(args, overrides: list[str]) -> dict:
    """Both variants per batch size: the pipeline once per variant against the fused loop; then the
    fused loop with the UNet compiled as `inpaint.compile` does it (its first batch, the compile, apart)."""
    cfg = load_config(overrides=[*overrides, f"inpaint.num_inference_steps={args.steps}"])
    device = torch.device(cfg.models.device)
    dtype = builders.torch_dtype(cfg.models.dtype, device)
    guidance = cfg.inpaint.guidance_scale
    batch = gpu_inpaint.masked_images(cfg, args.images)
    size = batch["image"].shape[1]
    peak = gpu_inpaint.peak_tflops(device, dtype)
    stage = builders.build_inpainter(cfg)  # channels-last on CUDA, as the job runs it
    pipe = stage.pipe
    tflop = gpu_inpaint.unet_tflop_per_image(pipe, size, args.steps, guided=True)
    out = {"preset": cfg.models.preset, "dtype": cfg.models.dtype, "size": size, "steps": args.steps,
           "images": args.images, "peak_tflops": float(f"{peak:.3g}"), "unet_tflop_per_image": float(f"{tflop:.3g}"),
           "eager": {}, "compiled": {}}
    with torch.inference_mode():
        for b in args.batch_sizes:
            per_variant = gpu_inpaint.both_variants(pipe, batch, b, args.steps, guidance, device, fused=False)
            fused = gpu_inpaint.both_variants(pipe, batch, b, args.steps, guidance, device, fused=True)
            out["eager"][b] = {"pipeline_per_variant_images_per_s": round(per_variant, 3),
                               "fused_images_per_s": round(fused, 3), "fused_speedup": round(fused / per_variant, 3),
                               "fused_unet_of_peak": round(fused * 1.5 * tflop / peak, 3)}
            print(f"eager, batch {b}: per variant {per_variant:.3f} img/s, fused {fused:.3f} img/s", flush=True)
    b = args.compile_batch or max(args.batch_sizes)
    compile_unet(pipe, "off" if args.smoke else "default")  # the smoke run: this section's code, not a compile

    def fused_batch(i: int) -> None:
        s = slice(i * b, (i + 1) * b)
        with torch.inference_mode():
            denoise(pipe, batch["image"][s], batch["mask"][s], {"guided": list(batch["caption"][s]), "baseline": None},
                    list(range(i * b, (i + 1) * b)), args.steps, guidance)
        gpu_inpaint.sync(device)

    rate, times = gpu_inpaint.rate(args.images // b, b, fused_batch)
    eager = out["eager"].get(b, {}).get("fused_images_per_s")
    out["compiled"] = {"mode": "off (smoke)" if args.smoke else "default", "batch_size": b,
                       "first_batch_s": round(times[0], 2), "fused_images_per_s": round(rate, 3),
                       "speedup_over_eager": round(rate / eager, 3) if eager else None}
    print(f"compiled, batch {b}: first batch (compile) {times[0]:.1f} s, then {rate:.3f} img/s", flush=True)
    stage = pipe = None  # the GPU's memory free before the job's actors load their models
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def generate(args, overrides: list[str]) -> dict:
    """The generate job on `--job-images` images (the shipped photographs under new names), its
    stats.json's per-stage busy seconds, and the GPU's utilisation while it ran."""
    from rayjobs import generate as generate_job

    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    try:
        photos = sorted(p for p in sample_images_dir().iterdir() if p.suffix in (".jpg", ".png"))
        (work / "images").mkdir()
        for i in range(args.job_images):
            shutil.copy(photos[i % len(photos)], work / "images" / f"img{i:04d}{photos[i % len(photos)].suffix}")
        cfg = load_config(overrides=[*overrides, *args.job_overrides, f"inpaint.num_inference_steps={args.steps}",
                                     f"data.source={work / 'images'}", f"run_dir={work / 'run'}"])
        start = time.perf_counter()
        with GpuSampler() as gpu:
            stats = generate_job.run(cfg)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"images": args.job_images, "ok": stats["ok"], "errors": stats["errors"], "wall_s": round(wall, 2),
            "pipeline_s": stats["this_run"]["pipeline_s"], "images_per_s": stats["this_run"]["images_per_s"],
            "stages": stats["stages"], "gpu": gpu.summary(), "overrides": args.job_overrides}


def finetune(args, overrides: list[str]) -> dict:
    """Seconds per step of BLIP's text-decoder fine-tune (vision encoder frozen, AdamW, the
    captioning loss) under autocast in bf16 and in fp16 (CUDA only, with a grad scaler): the
    arithmetic of the fine-tune's step, outside DeepSpeed and Ray Train."""
    cfg = load_config(overrides=[*overrides, "models.dtype=fp32", "caption.decoder_dtype=fp32"])
    device = torch.device(cfg.models.device)
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if dtype == torch.float16 and device.type != "cuda":
            out[name] = {"skipped": "fp16 needs CUDA"}
            continue
        blip = builders.load_blip(cfg)
        model = blip.model.train()
        model.vision_model.requires_grad_(False)
        side = model.config.vision_config.image_size
        pixels = torch.randn(args.finetune_batch, 3, side, side, device=device)
        ids = blip.tokenizer(["a photograph of a street with people and a car"] * args.finetune_batch,
                             return_tensors="pt").input_ids.to(device)
        optimizer = torch.optim.AdamW([p for p in model.text_decoder.parameters() if p.requires_grad], lr=1e-6)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        times = []
        for _ in range(args.finetune_steps):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype):
                loss = model(pixel_values=pixels, input_ids=ids, labels=ids).loss
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            gpu_inpaint.sync(device)
            times.append(time.perf_counter() - start)
        steady = times[1:] or times
        out[name] = {"batch_size": args.finetune_batch, "steps": args.finetune_steps,
                     "first_step_s": round(times[0], 3), "step_s": round(sum(steady) / len(steady), 4),
                     "loss": round(loss.item(), 4)}
        if device.type == "cuda":
            out[name]["memory_max_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        del blip, model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"fine-tune step, {name}: {out[name]['step_s']} s at batch {args.finetune_batch}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: checks the script, not the GPU")
    parser.add_argument("--images", type=int, default=24, help="images of the inpainting section")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--compile-batch", type=int, default=None, help="default: the largest batch size")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--job-images", type=int, default=32)
    parser.add_argument("--job-overrides", nargs="*", default=[
        "stream.inpainter.batch_size=8", "stream.inpainter.num_gpus=0.6", "stream.inpainter.size=1",
        "stream.captioner.batch_size=16", "stream.captioner.num_gpus=0.2", "stream.captioner.size=1",
        "stream.metrics.batch_size=16", "stream.metrics.num_gpus=0.2", "stream.metrics.size=1"])
    parser.add_argument("--finetune-batch", type=int, default=8)
    parser.add_argument("--finetune-steps", type=int, default=6)
    parser.add_argument("--out", default="bench/results/gpu_bench.json")
    args = parser.parse_args()
    if args.smoke:
        overrides = ["models.preset=tiny", "models.device=cpu", "models.dtype=fp32"]
        args.images, args.batch_sizes, args.steps, args.job_images = 4, [2], 2, 4
        args.job_overrides, args.finetune_batch, args.finetune_steps = [], 2, 2
    else:
        overrides = ["models.preset=fullsize", "models.device=cuda", "models.dtype=fp16", "data.image_size=512"]
    result = {"command": " ".join(["bash bench/gpu_bench.sh", *sys.argv[1:]]), "date": date.today().isoformat(),
              "seconds": {}}
    started = time.perf_counter()
    for name, run in (("environment", lambda: environment()), ("inpaint", lambda: inpaint(args, overrides)),
                      ("generate", lambda: generate(args, overrides)), ("finetune", lambda: finetune(args, overrides))):
        start = time.perf_counter()
        result[name] = run()
        result["seconds"][name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {result['seconds'][name]} s", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))  # after each section: a cut run keeps what it has
    result["seconds"]["total"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out} ({result['seconds']['total']} s)")


if __name__ == "__main__":
    main()
