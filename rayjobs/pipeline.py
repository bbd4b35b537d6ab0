"""The main job: every step of the method in order, each reusing what `run_dir` already holds.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python -m rayjobs.pipeline --config configs/paper-coco.yaml

    python -m rayjobs.pipeline [--config CONFIG.yaml] [dotted.key=value ...]

With no `--config` the embedded default runs: the `tiny` preset on the sample images that
ship with blipinpaint, on a local Ray bound to 127.0.0.1. Steps so far:
1. `rayjobs.generate`: captions, inpaintings and metrics as Parquet (`run_dir/generate/`).
"""

from __future__ import annotations

import logging
import sys

from blipinpaint.config import ConfigError, parse_args
from rayjobs import generate


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = parse_args(argv, description=__doc__.split("\n")[0])
    try:
        stats = generate.run(cfg)
    except ConfigError as err:
        print(f"pipeline: {err}", file=sys.stderr)
        return 2
    generate.print_summary(stats, f"{cfg.run_dir}/generate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
