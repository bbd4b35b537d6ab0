"""The main job: every step of the method in order, each reusing what `run_dir` already holds.

On a GPU cluster (README, "Running on a cluster"; `~/.ray/auth_token` made first):

    ray up cluster.yaml && ray dashboard cluster.yaml &    # job API tunnelled to 127.0.0.1:8265
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.pipeline --config configs/paper-coco.yaml
    RAY_AUTH_MODE=token ray job logs --address http://127.0.0.1:8265 --follow <submission id>
    RAY_AUTH_MODE=token ray job stop --address http://127.0.0.1:8265 <submission id>
    ray down cluster.yaml                                  # when every job is done

Locally (a Ray on 127.0.0.1 when no address is given):

    python -m rayjobs.pipeline [--config CONFIG.yaml] [dotted.key=value ...]

With no `--config` the embedded default runs: the `tiny` preset on the sample images that
ship with blipinpaint, on a local Ray bound to 127.0.0.1. Steps:
0. `rayjobs.models`: pinned hub checkpoints into the model store as verified safetensors
   (`run_dir/models/` by default); nothing to do for the offline presets.
1. `rayjobs.generate`: captions, inpaintings and metrics as Parquet (`run_dir/generate/`);
   a rerun only does the inputs not yet committed.
2. `rayjobs.train_scorer`: the scoring network (`run_dir/scorer/`); skipped when trained.
3. `rayjobs.finetune_blip`: BLIP fine-tuned through it (`run_dir/blip/`); skipped when done.
   With `finetune.method=reward_ranked`, `rayjobs.candidates` runs first: each training
   image's `caption.candidates` captions inpainted and scored (`run_dir/candidates/`; a
   rerun only does the candidates not yet committed), and BLIP learns the best of them.
4. `rayjobs.evaluate`: FID and CLIP score of the three variants, the Table 1 report
   (`run_dir/eval/`); skipped when its report exists (run `rayjobs.evaluate` to redo it).
"""

from __future__ import annotations

import logging
import sys

from blipinpaint.config import Config
from blipinpaint.storage import is_file
from rayjobs import candidates, evaluate, finetune_blip, generate, models, train_scorer
from rayjobs.common import job_main

log = logging.getLogger("blipinpaint.pipeline")


def run(cfg: Config) -> None:
    root = cfg.run_dir.rstrip("/")
    models.print_report(models.run(cfg))
    stats = generate.run(cfg)
    generate.print_summary(stats)
    if is_file(f"{root}/scorer/model/model.safetensors"):
        log.info("scorer already trained in %s/scorer: skipped", root)
    else:
        train_scorer.print_report(train_scorer.run(cfg))
    if cfg.finetune.method == "reward_ranked":  # cheap when done: it skips what is committed
        candidates.print_report(candidates.run(cfg))
    if is_file(f"{root}/blip/model.safetensors"):
        log.info("BLIP already fine-tuned in %s/blip: skipped", root)
    else:
        finetune_blip.print_report(finetune_blip.run(cfg))
    if is_file(f"{root}/eval/report.json"):
        log.info("already evaluated in %s/eval: skipped", root)
    else:
        evaluate.print_report(evaluate.run(cfg))


def main(argv: list[str] | None = None) -> int:
    return job_main("pipeline", __doc__, run, lambda _: None, argv)


if __name__ == "__main__":
    sys.exit(main())
