"""The main job: every step of the method in order, each reusing what `run_dir` already holds.

    python -m rayjobs.pipeline [--config CONFIG.yaml] [dotted.key=value ...]

On a cluster (the tunnel, the token, logs and stop: docs/cluster.md):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.pipeline --config configs/paper-coco.yaml

With no `--config` the embedded default runs: the `tiny` preset on the sample images that
ship with blipinpaint, on a local Ray bound to 127.0.0.1. The steps: `rayjobs.models`
(pinned checkpoints into the model store), `rayjobs.generate` (a rerun does only what is
not committed), `rayjobs.train_scorer`, with `finetune.method=reward_ranked`
`rayjobs.candidates`, `rayjobs.finetune_blip`, `rayjobs.evaluate`. A step is skipped only
when it finished under the fingerprint it would have now; `restart=[step]` replaces an
output made under other settings or inputs (docs/inputs-outputs.md, "Reruns"). With
`dry_run=true` only generate's plan is made (`rayjobs.generate`), and nothing runs after it.
"""

from __future__ import annotations

import logging
import sys

from blipinpaint import fingerprint
from blipinpaint.config import Config
from blipinpaint.layout import RunLayout
from rayjobs import candidates, evaluate, finetune_blip, generate, models, train_scorer
from rayjobs.cli import job_main

log = logging.getLogger("blipinpaint.pipeline")


def run(cfg: Config) -> None:
    run_layout = RunLayout(cfg.run_dir)
    if cfg.dry_run:  # generate's plan only: the later steps read rows that are not made yet
        generate.print_summary(generate.run(cfg))
        return
    models.print_report(models.run(cfg))
    stats = generate.run(cfg)
    generate.print_summary(stats)
    # A training or evaluation step is skipped only when it finished under the fingerprint it
    # would have now (settings, models, the rows and models it reads); else its job runs, and
    # resumes, refuses other settings, or with `restart` replaces the old output.
    if fingerprint.done(run_layout.scorer, fingerprint.scorer(cfg)):
        log.info("scorer already trained in %s under these settings and rows: skipped", run_layout.scorer)
    else:
        train_scorer.print_report(train_scorer.run(cfg))
    if cfg.finetune.method == "reward_ranked":  # cheap when done: it skips what is committed
        candidates.print_report(candidates.run(cfg))
    if fingerprint.done(run_layout.finetune, fingerprint.finetune(cfg)):
        log.info("BLIP already fine-tuned in %s under these settings and inputs: skipped", run_layout.blip)
    else:
        finetune_blip.print_report(finetune_blip.run(cfg))
    if fingerprint.done(run_layout.eval, fingerprint.report(cfg)):
        log.info("already evaluated in %s under these settings and inputs: skipped", run_layout.eval)
    else:
        evaluate.print_report(evaluate.run(cfg))


def main(argv: list[str] | None = None) -> int:
    return job_main("pipeline", __doc__, run, lambda _: None, argv)


if __name__ == "__main__":
    sys.exit(main())
