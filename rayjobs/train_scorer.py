"""Train the scoring network: cached caption features -> SSIM, PSNR, CLIP score.

    python -m rayjobs.train_scorer [--config CONFIG.yaml] [dotted.key=value ...]

On a cluster (the tunnel, the token, logs and stop: docs/cluster.md):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.train_scorer --config configs/paper-coco.yaml

Reads generate's training rows (BLIP is not loaded: generate cached its features, so an
epoch is a pass over a small table) on `train.num_workers` DeepSpeed ZeRO workers; the
targets are standardised with the training split's statistics. Writes `run_dir/scorer/`:
the model (safetensors + config.json), `metrics.jsonl`, `report.json` (held-out MAE and R²
against predicting the mean), `loss.png`, `scatter.png`, `config.yaml`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from blipinpaint import fingerprint
from blipinpaint.commit_log import CommitLog
from blipinpaint.config import Config, to_yaml
from blipinpaint.errors import ConfigError
from blipinpaint.layout import RunLayout
from blipinpaint.plots import plot_curves, plot_scatter, write_tensorboard
from blipinpaint.reader import read_rows, split_reads
from blipinpaint.scorer import TARGETS, ScoreNet, ScoreNetConfig, regression_report
from blipinpaint.seeds import sample_seed
from blipinpaint.storage import is_file, local_dir, read_jsonl, upload_dir, write_jsonl, write_text
from rayjobs import training
from rayjobs.cli import job_main
from rayjobs.cluster import connect
from rayjobs.progress import TrainProgress

log = logging.getLogger("blipinpaint.train_scorer")
COLUMNS = ["id", "caption_features", *TARGETS]


def _xy(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(np.stack(batch["caption_features"]), dtype=torch.float32, device=device)
    y = torch.as_tensor(np.stack([batch[t] for t in TARGETS], axis=1), dtype=torch.float32, device=device)
    return x, y


def share(reads: list[dict], rank: int, world: int, equal: bool) -> dict:
    """Rank `rank`'s run of the rows `reads` (from `row_reads`) name, as a `read_rows` batch:
    the ids in order cut into `world` runs, so a rank opens only the parts holding its run.
    `equal` leaves out the last `len % world` rows, as Ray Train's equal split does: every
    rank then takes the same number of optimizer steps (DeepSpeed's collectives need that)."""
    rows = [(read["path"], i) for read in reads for i in read["ids"]]
    if equal:
        rows = rows[:len(rows) - len(rows) % world]
    mine = rows[rank * len(rows) // world:(rank + 1) * len(rows) // world]
    by_part = {}
    for path, i in mine:
        by_part.setdefault(path, []).append(i)
    return {"path": list(by_part), "ids": list(by_part.values())}


def _load(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not batch["path"]:  # no rows on this rank: the feature width comes from the others
        return torch.zeros(0, 0, device=device), torch.zeros(0, len(TARGETS), device=device)
    return _xy(read_rows(batch, COLUMNS), device)


def finite_rows(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The rows whose targets are all finite, and how many were left out: a hole restored
    exactly has an infinite PSNR, and one such target would make the standardisation and
    every loss after it infinite or NaN."""
    keep = torch.isfinite(y).all(dim=1)
    return x[keep], y[keep], int((~keep).sum())


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def target_stats(y: torch.Tensor) -> tuple[list[float], list[float]]:
    """Mean and spread (n - 1) of each target over the rows of every rank: a collective when
    distributed, two passes in float64."""
    y = y.double()
    n = _all_reduce(torch.tensor(float(len(y)), dtype=torch.float64, device=y.device))
    mean = _all_reduce(y.sum(0)) / n.clamp(min=1)
    spreads = (_all_reduce(((y - mean) ** 2).sum(0)) / (n - 1).clamp(min=1)).sqrt()
    # A target constant over the training split (CLIP score clamped to 0 on every row, as
    # random models give) is centred but not scaled: dividing by ~0 would blow up held-out rows.
    return mean.tolist(), [s if s > 1e-6 else 1.0 for s in spreads.tolist()]


def train_loop(config: dict) -> None:
    import deepspeed  # imported on the worker: it picks the accelerator of that machine

    cfg: Config = config["cfg"]
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    # This rank's rows, read once by the rank itself: an epoch is then a pass over tensors in
    # memory. The scorer's inputs are small (one vector per sample), so a Ray Data execution
    # (its coordinator and read tasks, ~15 s of every run here) would buy nothing.
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    x_train, y_train = _load(share(config["train_reads"], rank, world, equal=True), device)
    x_val, y_val = _load(share(config["val_reads"], rank, world, equal=False), device)
    # The feature width, from every rank's rows (a rank may have none).
    width = int(_all_reduce(torch.tensor(max(x_train.shape[1], x_val.shape[1]), device=device),
                            dist.ReduceOp.MAX).item())
    x_train, x_val = x_train.reshape(-1, width), x_val.reshape(-1, width)
    x_train, y_train, train_left_out = finite_rows(x_train, y_train)
    x_val, y_val, val_left_out = finite_rows(x_val, y_val)
    # Every rank takes the same number of optimizer steps (DeepSpeed's collectives need
    # that): the training shares, equal before, are cut to the smallest that is left.
    rows = int(_all_reduce(torch.tensor(len(x_train), device=device), dist.ReduceOp.MIN).item())
    x_train, y_train = x_train[:rows], y_train[:rows]
    left_out = {"train": int(_all_reduce(torch.tensor(train_left_out, device=device)).item()),
                "heldout": int(_all_reduce(torch.tensor(val_left_out, device=device)).item())}
    torch.manual_seed(cfg.seed)
    model = ScoreNet(ScoreNetConfig(in_features=width, hidden=tuple(cfg.scorer.hidden))).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.scorer.lr)
    # The MLP trains in fp32 whatever `models.dtype` says: bf16 would save seconds per run
    # (BENCHMARKS.md, "Scorer precision") and cost the exactness of the cached fp32 features
    # and of the standardised targets.
    engine = training.initialize(model, optimizer, training.deepspeed_config(cfg, cfg.scorer.batch_size, dtype="fp32"))
    state = training.restore(engine)
    if not training.still_owner(config["fence"]):  # a straggler of a run taken over
        return
    start = state["epoch"] + 1 if state else 0
    log_uri = config["log_uri"]
    if ctx.get_world_rank() == 0:  # a resumed run redoes the epochs after its checkpoint
        write_jsonl(log_uri, [r for r in read_jsonl(log_uri) if r["epoch"] < start])
    # The targets' standardisation: a new run takes it from every rank's training rows; a
    # resumed run keeps its checkpoint's (with another number of workers, or rows generated
    # since, the ranks hold other rows now).
    standardization = (state["mean"], state["std"]) if state else target_stats(y_train)
    model.set_standardization(*standardization)
    y_train, y_val = model.standardize(y_train), model.standardize(y_val)
    batch = training.per_worker(cfg, cfg.scorer.batch_size)
    progress = TrainProgress("train_scorer", cfg.scorer.epochs, start, cfg.progress_s, math.ceil(len(x_train) / batch))
    for epoch in range(start, cfg.scorer.epochs):
        engine.train()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of batch losses x rows, rows
        # Shuffled per epoch from (seed, rank, epoch): a resumed run sees the same order.
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(
            sample_seed(cfg.seed, f"{ctx.get_world_rank()}/{epoch}", "scorer-order")))
        for step, index in enumerate(order.split(batch), start=1):
            x, y = x_train[index], y_train[index]
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            total += torch.tensor([loss.item() * len(x), len(x)], dtype=torch.float64, device=device)
            if rank == 0:
                progress.step(epoch, step, loss.item())
            training.maybe_fail(cfg, engine.global_steps, resumed=state is not None)
        engine.eval()
        # Held-out: squared error of the model and of predicting 0 (the standardised train mean).
        # Every rank runs the forward, even on no rows: ZeRO-3 gathers parameters collectively.
        with torch.no_grad():
            val = torch.tensor([((engine(x_val) - y_val) ** 2).mean(1).sum().item(),
                                (y_val ** 2).mean(1).sum().item(), len(x_val)], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        dist.all_reduce(val)
        metrics = {"epoch": epoch, "step": engine.global_steps, "resumed_at_epoch": start if state else None,
                   "engine": training.engine_settings(engine),
                   "train_loss": (total[0] / total[1].clamp(min=1)).item(),
                   # None without held-out rows (a handful of inputs may hash none there)
                   "val_loss": (val[0] / val[2]).item() if val[2] else None,
                   "val_loss_mean_baseline": (val[1] / val[2]).item() if val[2] else None,
                   "non_finite_left_out": left_out, **training.loss_scaling(engine)}
        if not training.still_owner(config["fence"]):
            return
        if rank == 0:
            write_jsonl(log_uri, [*read_jsonl(log_uri), metrics])
            progress.epoch(epoch, {"train loss": metrics["train_loss"], "held-out loss": metrics["val_loss"]})
        # Ray Train takes one report per controller poll (`training.CONTROLLER_POLL_S`): report
        # with checkpoints only.
        if (epoch + 1) % cfg.scorer.checkpoint_every == 0 or epoch + 1 == cfg.scorer.epochs:
            training.save_and_report(engine, metrics, {"epoch": epoch, "mean": standardization[0],
                                                      "std": standardization[1]})
    # ZeRO-3 keeps each large weight split over the ranks: gather them (a collective) to save.
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=cfg.train.zero_stage == 3):
        if ctx.get_world_rank() == 0 and training.owner_log(config["fence"]).owns():
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                upload_dir(folder, config["model_dir"])


def evaluate(model_dir: str, reads: list[dict], out_dir: str, limit: int = 20_000) -> dict:
    """MAE and R² on the held-out rows that `reads` name (up to `limit` of them, read here one
    part at a time), and the scatter plot; with fewer than two held-out rows (R² needs two),
    why there are none."""
    model = ScoreNet.from_pretrained(local_dir(model_dir))
    preds, trues, rows = [], [], 0
    for read in reads:
        if rows >= limit:
            break
        x, y = _xy(read_rows({"path": [read["path"]], "ids": [read["ids"][:limit - rows]]}, COLUMNS),
                   torch.device("cpu"))
        x, y, _ = finite_rows(x, y)  # counted by the training job's log
        with torch.no_grad():
            preds.append(model.destandardize(model(x)))
        trues.append(y)
        rows += len(x)
    if rows < 2:
        return {"missing": f"{rows} held-out samples with finite targets: R² needs at least 2 (more inputs, or a "
                           "larger train.val_fraction)"}
    pred, true = torch.cat(preds), torch.cat(trues)
    report = regression_report(pred, true, model.mean)
    plot_scatter(pred.numpy(), true.numpy(), TARGETS, f"{out_dir}/scatter.png")
    return report


def run(cfg: Config) -> dict:
    run_layout = RunLayout(cfg.run_dir)
    out_dir = run_layout.scorer
    if not is_file(run_layout.generate.success):  # a partial folder would train on what happens to be there
        raise ConfigError(f"{run_layout.generate} is not complete (no _SUCCESS): run rayjobs.generate (again) first")
    train_reads, val_reads = split_reads(cfg)
    # The folder is this run's only if it holds this fingerprint (or, with `restart`, is moved aside).
    current = fingerprint.scorer(cfg)
    fingerprint.claim(cfg, "scorer", (out_dir,), current)
    # Then, before anything waits for the cluster: the ranks of a run that is still going (its
    # driver killed, or the same command twice) stop writing here and free their resources.
    fence = (out_dir, CommitLog(out_dir).take_over())
    connect(cfg.ray_address, cfg.ray_progress)
    log.info("batch of %d per optimizer step: %d on each of %d workers", cfg.scorer.batch_size,
             training.per_worker(cfg, cfg.scorer.batch_size), cfg.train.num_workers)
    write_text(out_dir.config, to_yaml(cfg))
    trainer = training.make_trainer(
        train_loop, {"cfg": cfg, "log_uri": out_dir.metrics, "model_dir": run_layout.scorer_model,
                     "fence": fence, "train_reads": train_reads, "val_reads": val_reads},
        cfg, name="train_scorer", storage=out_dir.ray_train,
    )
    training.fit(trainer, cfg, fence)
    records = read_jsonl(out_dir.metrics)
    plot_curves(records, "epoch", {"train_loss": "train", "val_loss": "held-out",
                                   "val_loss_mean_baseline": "held-out, predict the mean"},
                "scorer loss (MSE, standardised targets)", out_dir / "loss.png")
    if cfg.train.tensorboard:
        write_tensorboard(records, "epoch", out_dir / "tensorboard")
    final = records[-1] if records else {}
    training.check_trained("train_scorer", final.get("step", 0), final.get("skipped_steps", 0),
                           final.get("loss_scale"), out_dir.metrics)
    report = {"epochs": len(records), "final": final, "steps": final.get("step", 0),
              "skipped_steps": final.get("skipped_steps", 0), "loss_scale": final.get("loss_scale"),
              "non_finite_left_out": final.get("non_finite_left_out"),
              "heldout": evaluate(run_layout.scorer_model, val_reads, out_dir), "fingerprint": current}
    write_text(out_dir.report, json.dumps(report, indent=2))
    fingerprint.finish(out_dir, current)  # last: the scorer is done, under these settings and rows
    training.owner_log(fence).release()
    return report


def main(argv: list[str] | None = None) -> int:
    return job_main("train_scorer", __doc__, run, print_report, argv)


def print_report(report: dict) -> None:
    final = report["final"]
    if final.get("val_loss") is None:
        print(f"\nscorer: {report['epochs']} epochs, train loss {final.get('train_loss', float('nan')):.4f}; "
              "no held-out rows (too few inputs)")
    else:
        print(f"\nscorer: {report['epochs']} epochs, held-out loss {final['val_loss']:.4f} "
              f"(predict-the-mean {final['val_loss_mean_baseline']:.4f})")
    if report.get("skipped_steps"):
        print(f"  DeepSpeed skipped {report['skipped_steps']} of {report['steps']} optimizer steps (an inf or NaN "
              "gradient)")
    if "missing" in report["heldout"]:
        print(f"  no held-out figures: {report['heldout']['missing']}")
        return
    for name, r in report["heldout"].items():
        print(f"  {name:<11} MAE {r['mae']:.4f} (mean baseline {r['mae_mean_baseline']:.4f})  "
              f"R² {r['r2']:.3f} (baseline {r['r2_mean_baseline']:.3f})")
    left_out = report.get("non_finite_left_out") or {}
    if any(left_out.values()):
        print(f"  left out for a non-finite target (a hole restored exactly: infinite PSNR): "
              f"{left_out['train']} training rows, {left_out['heldout']} held-out rows")


if __name__ == "__main__":
    sys.exit(main())
