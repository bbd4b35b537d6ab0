"""The main job: caption -> inpaint (guided and baseline) -> metrics on a set of images.

    python -m rayjobs.pipeline [--config CONFIG.yaml] [dotted.key=value ...]

With no `--config` the embedded default runs: the `tiny` preset on the sample images that
ship with blipinpaint. This first version runs the stages in this process; the Ray Data
generate job replaces the loop below and the training and evaluation jobs follow it.

Outputs under `run_dir/generate/`: `samples/*.parquet`, `errors/*.parquet`, `stats.json`
and the resolved `config.yaml`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from blipinpaint import stages
from blipinpaint.config import Config, parse_args, sample_images_dir, to_yaml
from blipinpaint.records import ERROR_SCHEMA, METRIC_COLUMNS, SampleEncoder, error_rows
from blipinpaint.sources import list_folder, read_files

BATCH_SIZE = 4  # small: the tiny models run on 2 CPU cores


def _take(batch: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


def run_local(cfg: Config) -> dict:
    """Run every stage in-process; write samples, errors, stats and the resolved config."""
    started = time.perf_counter()
    out_dir = Path(cfg.run_dir) / "generate"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(cfg))

    items = list_folder(cfg.data.source or sample_images_dir(), cfg.data.limit)
    decode, mask = stages.build_decoder(cfg), stages.build_masker(cfg)
    caption, inpaint, score = stages.build_captioner(cfg), stages.build_inpainter(cfg), stages.build_metrics(cfg)
    preset = stages.resolve_preset(cfg)
    encode = SampleEncoder({"captioner": preset.captioner.name_or_path, "inpainter": preset.inpainter.name_or_path,
                            "clip": preset.clip.name_or_path})

    samples, errors = [], []
    with tqdm(total=len(items), desc="generate", unit="img") as bar:
        for start in range(0, len(items), BATCH_SIZE):
            batch = decode(read_files(items[start:start + BATCH_SIZE]))
            errors.append(error_rows(batch))
            ok = np.array([not e for e in batch["error"]], dtype=bool)
            if ok.any():
                samples.append(encode(score(inpaint(caption(mask(_take(batch, ok)))))))
            bar.update(len(batch["id"]))

    sample_table = pa.concat_tables([pa.table(s) for s in samples]) if samples else None
    error_table = pa.concat_tables([pa.table(e, schema=ERROR_SCHEMA) for e in errors])
    for name, table in (("samples", sample_table), ("errors", error_table)):
        (out_dir / name).mkdir(exist_ok=True)
        if table is not None and table.num_rows:
            pq.write_table(table, out_dir / name / "part-00000.parquet")

    n_ok = sample_table.num_rows if sample_table is not None else 0
    reasons = [e.split(":")[0] for e in error_table.column("error").to_pylist()]
    stats = {
        "inputs": len(items), "ok": n_ok, "errors": len(reasons),
        "errors_by_reason": {r: reasons.count(r) for r in sorted(set(reasons))},
        "wall_s": round(time.perf_counter() - started, 2),
        "means": {m: float(np.mean(sample_table.column(m).to_numpy())) for m in METRIC_COLUMNS} if n_ok else {},
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    _print_summary(stats, sample_table, out_dir)
    return stats


def _print_summary(stats: dict, samples: pa.Table | None, out_dir: Path) -> None:
    print(f"\n{stats['inputs']} inputs: {stats['ok']} samples, {stats['errors']} errors "
          f"{stats['errors_by_reason'] or ''} in {stats['wall_s']} s")
    if samples is not None and samples.num_rows:
        print(f"{'metric':<12}{'guided':>10}{'baseline':>10}")
        for m in ("ssim", "psnr", "ssim_hole", "psnr_hole", "clip_score"):
            print(f"{m:<12}{stats['means'][m]:>10.3f}{stats['means'][m + '_baseline']:>10.3f}")
        for row in samples.select(["id", "caption"]).slice(0, 3).to_pylist():
            print(f"  {row['id']}: {row['caption']!r}")
    print(f"outputs in {out_dir}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv, description=__doc__.split("\n")[0])
    stats = run_local(cfg)
    return 0 if stats["inputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
