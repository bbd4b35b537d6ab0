"""Fine-tuning methods compared: how often BLIP's greedy caption is its best caption candidate.

    .venv/bin/python bench/reward_ranked.py [--out bench/results/reward_ranked.json] [dotted.key=value ...]

On the embedded default (the tiny preset, the shipped samples) and one seed: generate,
train the scorer and make the caption candidates (`rayjobs.candidates`, 4 per training
image, each inpainted and scored) once; then fine-tune BLIP twice from the same start, on
copies of that run folder, with `finetune.method=scorer` (the paper's: through the frozen
scorer) and with `finetune.method=reward_ranked` (the language-model loss on each image's
candidate of lowest real L_BLIP), with the same learning rate, batch and epochs. The
table gives, per method, the share of training images whose greedy caption equals its
best candidate before and after fine-tuning (the finetune report's `best_caption_share`).
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

import torch

from blipinpaint.config import load_config
from rayjobs import candidates, finetune_blip, generate, models, train_scorer
from rayjobs.cluster import connect

# The README's main command's scorer settings, 4 candidates per image, and a learning rate
# and number of epochs at which the tiny decoder's captions move (the paper's lr 1e-6
# leaves them as they are).
DEFAULTS = ["scorer.epochs=2", "caption.candidates=4", "finetune.lr=1e-2", "finetune.batch_size=2",
            "finetune.epochs=14"]
METHODS = ("scorer", "reward_ranked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/reward_ranked.json")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    parser.add_argument("overrides", nargs="*", help="config overrides (dotted.key=value)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-reward-ranked-"))
    shared = root / "shared"
    cfg = load_config(overrides=[f"run_dir={shared}", *DEFAULTS, *args.overrides])
    connect(cfg.ray_address)
    started = time.perf_counter()
    models.run(cfg)
    generate.run(cfg)
    train_scorer.run(cfg)
    stats = candidates.run(cfg)
    prepared_s = time.perf_counter() - started

    rows = []
    for method in METHODS:
        run_dir = root / method
        for part in ("generate", "scorer", "candidates"):  # the same start for both
            shutil.copytree(shared / part, run_dir / part)
        started = time.perf_counter()
        report = finetune_blip.run(load_config(overrides=[f"run_dir={run_dir}", *DEFAULTS, *args.overrides,
                                                          f"finetune.method={method}"]))
        share = report["best_caption_share"]
        rows.append({"method": method, "images": share["images"], "before": share["before"], "after": share["after"],
                     "steps": report["steps"], "first_loss": report["first_loss"], "last_loss": report["last_loss"],
                     "wall_s": round(time.perf_counter() - started, 1)})

    print(f"\n{stats['images']} training images, {stats['candidates_per_image']} candidates each (greedy caption "
          f"already the best for {stats['best_is_greedy']}); {' '.join(DEFAULTS + args.overrides)}")
    print(f"{'method':<16}{'images':>8}{'before':>9}{'after':>9}{'steps':>7}{'loss':>20}{'wall s':>9}")
    for r in rows:
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"
        print(f"{r['method']:<16}{r['images']:>8}{r['before']:>9.2f}{r['after']:>9.2f}{r['steps']:>7}{loss:>20}"
              f"{r['wall_s']:>9}")
    result = {"command": " ".join(["bench/reward_ranked.py", *args.overrides]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "date": date.today().isoformat(), "settings": DEFAULTS + args.overrides,
              "candidates": {k: stats[k] for k in ("images", "candidates_per_image", "ok", "errors", "best_is_greedy",
                                                   "mean_loss")},
              "prepare_s": round(prepared_s, 1), "methods": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if args.keep:
        print(f"run folders in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
