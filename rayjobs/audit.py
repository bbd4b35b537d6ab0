"""Audit a finished run: recompute a random sample of its rows and show they are what it committed.

    python -m rayjobs.audit [--config CONFIG.yaml] [audit.size=8 audit.seed=0 ...]

With the config the run was made with (its generate settings are checked against the
run's). On a cluster (the tunnel, the token, logs and stop: docs/cluster.md):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.audit --config configs/paper-coco.yaml audit.size=32

Checks that generate finished under the fingerprint it holds, then that the model store
holds the bytes the run used (each model's content digest against the recorded one:
otherwise it refuses, naming the model, before recomputing anything). Then it takes
`audit.size` committed rows (a hash order of `audit.seed` and the id), finds their inputs
in `data.source`, and recomputes them in Ray tasks of 32 rows (a GPU each when
`models.device=cuda`) through generate's own stages, from the same seeds. Per row and in
total it says whether the caption, the images (exactly for the input and mask; within
`audit.image_tolerance` levels for the inpaintings), the scores and caption features
(within `audit.score_tolerance`) are the ones committed, and by how much they differ. Writes
`report.json` below `audit.out` (default `run_dir/audit`). Exit status: 0 when every row
held, 1 when one did not, 2 when the audit refused (an unfinished run, other settings,
other models).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from importlib import metadata

import numpy as np
import ray

from blipinpaint import audit, builders, fingerprint, recorded
from blipinpaint.config import Config, sample_images_dir
from blipinpaint.errors import ConfigError, JobError
from blipinpaint.layout import Folder, RunLayout
from blipinpaint.reader import committed_sample_ids, read_sorted
from blipinpaint.sources import SourceError, list_inputs
from blipinpaint.storage import write_text
from rayjobs.cli import job_main
from rayjobs.cluster import connect

log = logging.getLogger("blipinpaint.audit")
# Rows one recomputing task takes: a large audit spreads over the cluster's GPUs, each task
# loading the models once.
ROWS_PER_TASK = 32
VERSIONS = ("torch", "transformers", "diffusers", "numpy", "pillow")  # what a recompute's numbers depend on


def check_models(cfg: Config, generated: dict) -> dict[str, str]:
    """The content digest of each model the rows depend on, as the store holds it now; a
    ConfigError naming each one that is missing or other than the run's."""
    current, problems = {}, []
    for role in recorded.MODEL_ROLES:
        try:
            current[role] = builders.model_digests(cfg, (role,))[role]
        except (OSError, JobError) as err:  # no folder, or one whose files differ from its manifest
            problems.append(f"{role}: {err}")
    problems += recorded.model_mismatches(generated, current)
    if problems:
        raise ConfigError(f"{RunLayout(cfg.run_dir).generate}: the model store does not hold the models the run used; "
                          "nothing was recomputed:\n  - " + "\n  - ".join(problems))
    return current


def find_inputs(cfg: Config, ids: list[str]) -> tuple[list[dict], list[str]]:
    """The inputs of `ids`, listed from `data.source` as generate lists them; and the ids not there."""
    try:
        items = list_inputs(cfg.data.source or str(sample_images_dir()), cfg.data.kind, cfg.data.image_root, None,
                            cfg.seed, cfg.data.image_column, cfg.data.id_column)
    except SourceError as err:
        raise ConfigError(f"cannot list the run's inputs: {err}") from None
    found = {it["id"]: it for it in items}
    return [found[i] for i in ids if i in found], [i for i in ids if i not in found]


def recompute_task(cfg: Config, items: list[dict]):
    """Ray task: `audit.recompute` where generate's workers ran (a GPU on a GPU run)."""
    return audit.recompute(cfg, items)


def recompute(cfg: Config, items: list[dict]) -> tuple[dict, dict[str, str]]:
    """`items` recomputed in Ray tasks of `ROWS_PER_TASK` rows: (the rows joined, their errors)."""
    task = ray.remote(recompute_task).options(num_cpus=cfg.audit.num_cpus,
                                              num_gpus=1 if cfg.models.device.startswith("cuda") else 0)
    done = ray.get([task.remote(cfg, items[at:at + ROWS_PER_TASK]) for at in range(0, len(items), ROWS_PER_TASK)])
    parts = [rows for rows, _ in done if len(rows["id"])]
    rows = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]} if parts else {"id": np.array([])}
    return rows, {i: e for _, errors in done for i, e in errors.items()}


def _finite(value):
    """JSON has no infinity: a difference between a finite and an infinite value is "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def run(cfg: Config) -> dict:
    started = time.perf_counter()
    generated_dir = RunLayout(cfg.run_dir).generate
    out = Folder((cfg.audit.out or RunLayout(cfg.run_dir).audit).rstrip("/"))
    # 1. A finished run, made with these settings; then its models, before anything is recomputed.
    generated = recorded.finished_generate(cfg)
    digests = check_models(cfg, generated)
    # 2. The sample and what the run committed for it.
    chosen = audit.choose(committed_sample_ids(generated_dir), cfg.audit.size, cfg.audit.seed)
    rows = read_sorted(generated_dir, chosen, audit.RECORDED_COLUMNS)
    items, missing = find_inputs(cfg, chosen)
    # 3. Recomputed on workers, as generate's stages ran.
    connect(cfg.ray_address, cfg.ray_progress)
    log.info("recomputing %d of %d committed rows", len(items), len(chosen))
    again, errors = recompute(cfg, items)
    errors |= {i: f"its input is not in data.source any more ({cfg.data.source or 'the shipped samples'})"
               for i in missing}
    # 4. Row by row.
    tol = audit.tolerances(cfg)
    models = {role: checkpoint for role, checkpoint in builders.model_ids(cfg).items()
              if role in recorded.MODEL_ROLES}
    results = audit.compare(chosen, rows, again, errors, models, tol)
    report = {
        "run_dir": cfg.run_dir, **audit.summary(results), "tolerances": tol, "rows_audited": results,
        "made_by": {"generate_fingerprint": fingerprint.digest_of(generated), "model_digests": digests,
                    "settings": {"audit.size": cfg.audit.size, "audit.seed": cfg.audit.seed,
                                 "models.device": cfg.models.device, "models.dtype": cfg.models.dtype},
                    "versions": {"python": platform.python_version(),
                                 **{name: metadata.version(name) for name in VERSIONS}}},
        "wall_s": round(time.perf_counter() - started, 2), "report": f"{out}/report.json",
    }
    write_text(report["report"], json.dumps(_finite(report), indent=2))
    return report


def print_summary(report: dict) -> None:
    print(f"\naudit of {report['run_dir']}: {report['held']} of {report['rows']} rows held "
          f"(tolerances: {report['tolerances']['image']:g} levels on inpaintings, {report['tolerances']['score']:g} "
          "on scores and caption features)")
    for row in report["rows_audited"]:
        print(f"  {row['id']}: {'held' if row['held'] else 'DIFFERS'}")
        for line in row["differs"]:
            print(f"      {line}")
    largest = ", ".join(f"{name} {value:.3g}" for name, value in sorted(report["max_diff"].items()) if value)
    print(f"largest differences: {largest or 'none'}")
    print(f"the run {report['verdict']}; report in {report['report']}")


def main(argv: list[str] | None = None) -> int:
    reports = []
    code = job_main("audit", __doc__, lambda cfg: reports.append(run(cfg)) or reports[-1], print_summary, argv)
    return 1 if code == 0 and reports and reports[-1]["failed"] else code


if __name__ == "__main__":
    sys.exit(main())
