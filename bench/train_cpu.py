"""Scorer epochs on cached caption features against recomputing BLIP features every epoch,
and the scorer's epoch in fp32 against bf16.

    .venv/bin/python bench/train_cpu.py [--samples 256] [--epochs 3] [models.preset=tiny ...]

The training job reads the features the generate job cached with each sample, so a scorer
epoch is a pass over one small tensor. A naive implementation would run BLIP every epoch:
the vision encoder on each masked image and the text decoder on its caption, then the same
scorer step. Both epochs here train the same scorer (same batch size, Adam) on the same
samples in this process; the cached side pays the one BLIP pass once, reported apart.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from blipinpaint import builders  # noqa: E402
from blipinpaint.captioning import caption_features, caption_ids, encode_images  # noqa: E402
from blipinpaint.config import load_config, sample_images_dir  # noqa: E402
from blipinpaint.masks import masked_pixels  # noqa: E402
from blipinpaint.scorer import TARGETS, ScoreNet, ScoreNetConfig  # noqa: E402
from blipinpaint.source_reads import read_files  # noqa: E402
from blipinpaint.sources import items_to_batch, list_folder  # noqa: E402


def samples(cfg, captioner, n: int) -> dict[str, np.ndarray]:
    """`n` masked images with captions: the shipped photographs repeated, each with its own mask."""
    items = list_folder(str(sample_images_dir()))
    items = [{**items[i % len(items)], "id": f"s{i:05d}"} for i in range(n)]
    batch = builders.build_masker(cfg)(builders.build_decoder(cfg)(read_files(items_to_batch(items))))
    return captioner(batch)


def blip_features(captioner, images: np.ndarray, masks: np.ndarray, captions: list[str]) -> torch.Tensor:
    """What the naive epoch recomputes per batch: ViT on the masked image, decoder on the caption."""
    bundle, model = captioner.bundle, captioner.model
    pixels = bundle.image_processor(images=list(masked_pixels(images, masks)), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = encode_images(model, pixels.to(model.device, model.dtype))
        ids = caption_ids(model, bundle.tokenizer, captions).to(model.device)
        return caption_features(model, embeds, ids).float()


def epoch(net: ScoreNet, optimizer, batches) -> None:
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def precision_epochs(samples: int, features: int, cfg, epochs: int) -> dict[str, float]:
    """Seconds per scorer epoch in fp32 and in bf16 (module and inputs cast, as DeepSpeed's bf16
    engine does), on random features: the MLP's cost does not depend on where they came from."""
    torch.manual_seed(0)
    x_all, y_all = torch.randn(samples, features), torch.randn(samples, len(TARGETS))
    chunks = [slice(i, i + cfg.scorer.batch_size) for i in range(0, samples, cfg.scorer.batch_size)]
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        net = ScoreNet(ScoreNetConfig(features, tuple(cfg.scorer.hidden))).to(dtype)
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.scorer.lr)
        x = x_all.to(dtype)
        epoch(net, optimizer, ((x[c], y_all[c].to(dtype)) for c in chunks[:10]))  # warm-up
        start = time.perf_counter()
        for _ in range(epochs):
            epoch(net, optimizer, ((x[c], y_all[c].to(dtype)) for c in chunks))
        out[name] = (time.perf_counter() - start) / epochs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision-samples", type=int, default=20_000,
                        help="768-d feature rows for the scorer's fp32-vs-bf16 epochs")
    parser.add_argument("--out", default="bench/results/train_cpu.json")
    parser.add_argument("overrides", nargs="*", help="config overrides (dotted.key=value)")
    args = parser.parse_args()
    cfg = load_config(overrides=args.overrides)
    captioner = builders.build_captioner(cfg)  # loaded once: captions the samples, then the naive epochs
    batch = samples(cfg, captioner, args.samples)
    y_all = torch.randn(args.samples, len(TARGETS))  # the targets do not change the cost of a step
    size = cfg.scorer.batch_size
    chunks = [slice(i, i + size) for i in range(0, args.samples, size)]

    start = time.perf_counter()
    x_all = torch.cat([blip_features(captioner, batch["image"][c], batch["mask"][c], list(batch["caption"][c]))
                       for c in chunks])
    cache_s = time.perf_counter() - start

    def train(batches_of_epoch) -> float:
        torch.manual_seed(0)
        net = ScoreNet(ScoreNetConfig(x_all.shape[1], tuple(cfg.scorer.hidden)))
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.scorer.lr)
        start = time.perf_counter()
        for _ in range(args.epochs):
            epoch(net, optimizer, batches_of_epoch())
        return (time.perf_counter() - start) / args.epochs

    cached_s = train(lambda: ((x_all[c], y_all[c]) for c in chunks))
    naive_s = train(lambda: ((blip_features(captioner, batch["image"][c], batch["mask"][c], list(batch["caption"][c])),
                              y_all[c]) for c in chunks))
    precision = precision_epochs(args.precision_samples, 768, cfg, args.epochs)
    result = {
        "command": " ".join(["bench/train_cpu.py", f"--samples {args.samples}", f"--epochs {args.epochs}",
                             *args.overrides]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads)",
        "date": date.today().isoformat(), "preset": cfg.models.preset, "samples": args.samples,
        "feature_dim": x_all.shape[1], "batch_size": size,
        "cache_features_once_s": round(cache_s, 3), "epoch_cached_s": round(cached_s, 4),
        "epoch_recomputed_s": round(naive_s, 4), "speedup": round(naive_s / cached_s, 1),
        "scorer_precision": {"samples": args.precision_samples, "feature_dim": 768,
                             "epoch_fp32_s": round(precision["fp32"], 4), "epoch_bf16_s": round(precision["bf16"], 4),
                             "bf16_speedup": round(precision["fp32"] / precision["bf16"], 2)},
    }
    print(f"{args.samples} samples ({cfg.models.preset} BLIP, features {x_all.shape[1]}-d): "
          f"epoch on cached features {cached_s * 1e3:.1f} ms, recomputing BLIP {naive_s * 1e3:.1f} ms "
          f"-> {naive_s / cached_s:.1f}x; the one caching pass {cache_s:.2f} s")
    print(f"scorer epoch on {args.precision_samples} 768-d features: fp32 {precision['fp32'] * 1e3:.0f} ms, "
          f"bf16 {precision['bf16'] * 1e3:.0f} ms -> bf16 runs {precision['fp32'] / precision['bf16']:.2f}x fp32")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
