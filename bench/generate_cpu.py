"""CPU throughput of the generate job against the authors' flow, and of the fused inpainter.

    .venv/bin/python bench/generate_cpu.py [--images 64 256] [--no-stage] [--out bench/results/generate_cpu.json]

Both sides do the same work per image on the same inputs and config (the tiny preset):
read + decode + mask, a BLIP caption, two inpaintings (guided and baseline), SSIM/PSNR/CLIP,
PNG encoding of the row. The loop is the authors' flow: one image at a time in this
process, the diffusers pipeline called once per variant (models built once beforehand, not
timed). The job is `rayjobs.generate.run` on a local Ray that is started first and timed on
its own, so its images/s exclude Ray start-up but include what a run of the job really
pays: starting its actors and loading their models.

Per image count this prints images/s of both and their ratio; with two counts it also
prints the marginal (steady-state) rate, (n2 - n1) / (t2 - t1), which cancels every fixed
cost (actor start, model load, the first batch) on both sides. Then the inpainting stage
alone, in this process, on the largest count's captioned images in batches of
`stream.inpainter.batch_size`: busy seconds per image of the pipeline called once per
variant (the stage before the fused loop) against the fused loop (`inpainting.denoise`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from blipinpaint import builders  # noqa: E402
from blipinpaint.config import load_config, sample_images_dir  # noqa: E402
from blipinpaint.inpainting import composite  # noqa: E402
from blipinpaint.records import encode_rows  # noqa: E402
from blipinpaint.seeds import sample_seed  # noqa: E402
from blipinpaint.source_reads import read_files  # noqa: E402
from blipinpaint.sources import items_to_batch, list_folder  # noqa: E402
from rayjobs import generate  # noqa: E402
from rayjobs.cluster import connect  # noqa: E402


def make_inputs(folder: Path, n: int) -> None:
    """`n` distinct JPEGs: the shipped photographs, each cropped and flipped differently."""
    photos = [Image.open(p).convert("RGB") for p in sorted(sample_images_dir().iterdir())
              if p.suffix.lower() in {".jpg", ".jpeg", ".png"}]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        k = i // len(photos)
        crop = img.crop((k % 7, k % 5, w - k % 3, h - k % 11))
        if k % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(folder / f"img{i:05d}.jpg", quality=90)


class PipelinePerVariant:
    """The inpainting stage as it was before the fused loop (and as the authors' script
    does it): the diffusers pipeline called once per variant, the same seeds and outputs."""

    def __init__(self, inpainter):
        self.inpainter = inpainter

    def __call__(self, batch: dict) -> dict:
        pipe, seeds = self.inpainter.pipe, [sample_seed(self.inpainter.seed, str(i), "noise") for i in batch["id"]]
        height, width = batch["image"].shape[1:3]
        out = {**batch, "noise_seed": np.array(seeds, dtype=np.int64)}
        for column, caption in self.inpainter.prompts.items():
            images = pipe(prompt=[""] * len(seeds) if caption is None else [str(c) for c in batch[caption]],
                          image=batch["image"].astype(np.float32) / 255.0,
                          mask_image=batch["mask"][..., None].astype(np.float32), height=height, width=width,
                          num_inference_steps=self.inpainter.steps,
                          guidance_scale=1.0 if caption is None else self.inpainter.guidance_scale,
                          generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images
            pixels = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
            out[column] = composite(pixels, batch["image"], batch["mask"])
        return out


def plain_loop(cfg, folder: Path, out: Path) -> float:
    """Seconds for the authors' flow over every image of `folder`, one at a time (models built first)."""
    decode, mask = builders.build_decoder(cfg), builders.build_masker(cfg)
    caption, metrics = builders.build_captioner(cfg), builders.build_metrics(cfg)
    inpaint = PipelinePerVariant(builders.build_inpainter(cfg))
    models = builders.model_ids(cfg)
    items = list_folder(str(folder))
    tables = []
    with torch.inference_mode():
        start = time.perf_counter()
        for item in items:
            batch = metrics(inpaint(caption(mask(decode(read_files(items_to_batch([item])))))))
            tables.append(encode_rows(batch, models))
        pq.write_table(pa.concat_tables(tables), out)
        return time.perf_counter() - start


def inpainting_stage(cfg, folder: Path, images: int = 64, rounds: int = 3) -> dict:
    """Busy seconds per image of the inpainting stage alone, per variant call and fused, on
    the same captioned batches of `stream.inpainter.batch_size` (models built first): the
    best of `rounds` rounds over `images` images, the two taking turns, so that neither gets
    the warmer or the quieter machine."""
    decode, mask, caption = builders.build_decoder(cfg), builders.build_masker(cfg), builders.build_captioner(cfg)
    fused = builders.build_inpainter(cfg)
    size = cfg.stream.inpainter.batch_size
    items = list_folder(str(folder))[:images]
    stages_ = {"pipeline per variant": PipelinePerVariant(fused), "fused": fused}
    seconds = {name: [] for name in stages_}
    with torch.inference_mode():
        batches = [caption(mask(decode(read_files(items_to_batch(items[i:i + size])))))
                   for i in range(0, len(items), size)]
        for _ in range(rounds):
            for name, stage in stages_.items():
                start = time.perf_counter()
                for batch in batches:
                    stage(batch)
                seconds[name].append((time.perf_counter() - start) / len(items))
    best = {name: min(times) for name, times in seconds.items()}
    return {"batch_size": size, "images": len(items), "rounds": rounds,
            "seconds_per_image": {k: round(v, 4) for k, v in best.items()},
            "fused_saves": round(1 - best["fused"] / best["pipeline per variant"], 3)}


def ray_job(cfg) -> tuple[float, dict]:
    """Seconds of the job's pipeline (actor start and model load included, Ray start-up not),
    and each stage's busy seconds (the profile of where the job's time went)."""
    stats = generate.run(cfg)
    assert stats["ok"] + stats["errors"] == stats["inputs"] and not stats["missing"], stats
    return stats["this_run"]["pipeline_s"], {s: v["busy_s"] for s, v in stats["stages"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--out", default="bench/results/generate_cpu.json")
    parser.add_argument("--no-stage", action="store_true",
                        help="only the job against the loop, not the inpainting stage alone (to compare an old "
                             "and a new tree in turns: PYTHONPATH=<tree>)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides (dotted.key=value)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    results = {"command": " ".join(["bench/generate_cpu.py --images", *map(str, args.images), *args.overrides]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                          f"({torch.get_num_threads()} threads), ray {ray.__version__}",
               "date": date.today().isoformat(), "overrides": args.overrides, "runs": []}
    t0 = time.perf_counter()
    connect()
    results["ray_start_s"] = round(time.perf_counter() - t0, 2)
    print(f"Ray start-up: {results['ray_start_s']} s")
    try:
        for n in args.images:
            folder = work / f"in{n}"
            make_inputs(folder, n)
            cfg = load_config(overrides=[f"run_dir={work}/run{n}", f"data.source={folder}", *args.overrides])
            loop_s = plain_loop(cfg, folder, work / f"loop{n}.parquet")
            job_s, busy = ray_job(cfg)
            run = {"images": n, "loop_s": round(loop_s, 2), "job_s": round(job_s, 2), "busy_s": busy,
                   "loop_images_per_s": round(n / loop_s, 3), "job_images_per_s": round(n / job_s, 3),
                   "ratio": round(loop_s / job_s, 2)}
            results["runs"].append(run)
            print(f"{n:>5} images: loop {run['loop_images_per_s']:.2f} img/s, job {run['job_images_per_s']:.2f} "
                  f"img/s, job/loop {run['ratio']:.2f}x")
        if len(results["runs"]) >= 2:
            a, b = results["runs"][0], results["runs"][-1]
            dn = b["images"] - a["images"]
            loop_rate, job_rate = dn / (b["loop_s"] - a["loop_s"]), dn / (b["job_s"] - a["job_s"])
            results["steady_state"] = {"loop_images_per_s": round(loop_rate, 3), "job_images_per_s": round(job_rate, 3),
                                       "ratio": round(job_rate / loop_rate, 2)}
            print(f"steady state ({a['images']}->{b['images']}): loop {loop_rate:.2f} img/s, job {job_rate:.2f} "
                  f"img/s, job/loop {job_rate / loop_rate:.2f}x")
        if not args.no_stage:
            n = max(args.images)
            cfg = load_config(overrides=[f"run_dir={work}/stage", f"data.source={work / f'in{n}'}", *args.overrides])
            results["inpainting_stage"] = inpainting_stage(cfg, work / f"in{n}")
            print(f"inpainting stage alone: {results['inpainting_stage']}")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
