"""FID at scale: mergeable feature statistics, and the Fréchet distance taken once.

Workers turn images into features (`FidFeatures`); features fold into `FeatureStats`
(count, sum, sum of outer products, in float64), which add up: statistics of shards merge
into the number a single pass over all images gives, and the distance is taken once.
The covariance and distance follow torchmetrics' `FrechetInceptionDistance`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np
import torch

from blipinpaint.io import decode_png


@dataclass
class FeatureStats:
    """Moments of a set of feature vectors; `merge` is addition, so order never matters."""

    count: int
    total: torch.Tensor  # (D,) float64
    outer: torch.Tensor  # (D, D) float64: sum of x xᵀ

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    def update(self, features: torch.Tensor) -> None:
        x = features.detach().to("cpu", torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(dim=0)
        self.outer += x.T @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(self.count + other.count, self.total + other.total, self.outer + other.outer)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased covariance; needs at least two vectors."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, cov


def frechet_distance(real: FeatureStats, fake: FeatureStats) -> float:
    """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂), the trace root from the eigenvalues of Σ₁Σ₂."""
    return _frechet(*real.mean_cov(), *fake.mean_cov())


def _frechet(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    diff = (mu1 - mu2).square().sum()
    # Σ₁Σ₂ is similar to a PSD matrix: real, non-negative eigenvalues up to rounding.
    trace_root = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float(diff + sigma1.trace() + sigma2.trace() - 2 * trace_root)


def fid_draw(features: dict[str, torch.Tensor], real: str, index: torch.Tensor | None = None) -> dict[str, float]:
    """FID of every set against `real` from per-sample features (rows aligned across sets), on
    the rows `index` (one bootstrap draw, with repeats; None: every row). On the features'
    device, in float64."""
    def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x if index is None else x[index]
        return x.mean(dim=0), torch.cov(x.T)

    reference = moments(features[real])
    return {name: _frechet(*reference, *moments(x)) for name, x in features.items() if name != real}


class FidFeatures:
    """A stage: PNG image columns -> each row's FID features, per image set.

    `sets` maps a set name (e.g. "ground_truth", "baseline") to its PNG column. The rows
    come out in the order of their ids, and go through the network in chunks of
    `batch_size` rows taken in that order: float32 convolutions round differently at
    another batch size, so the chunks depend on the batch's ids alone, never on how its
    rows arrived. A batch done again (after a lost worker) gives the same features bit for
    bit, and so the same FID (this tiny network's FIDs are so near zero that the last bits
    decide their digits). Features are float32, 8 KB a set per sample at 2048-d.
    """

    def __init__(self, net: torch.nn.Module, device: torch.device, sets: dict[str, str], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"evaluate.fid.batch_size must be at least 1, got {batch_size}")
        self.net, self.device, self.sets, self.batch_size = net, device, sets, batch_size

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"id", "mask_area" (when the batch has it), and a (rows, features) array per set}."""
        ids = np.asarray(batch["id"]).astype(str)
        order = np.argsort(ids, kind="stable")
        out = {"id": ids[order].astype(object)}
        if "mask_area" in batch:
            out["mask_area"] = np.asarray(batch["mask_area"])[order]
        for name, column in self.sets.items():
            chunks = []
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                # Decoded PNG, uint8 (B, 3, H, W): the exact pixels that were scored.
                images = torch.from_numpy(np.stack([decode_png(batch[column][i]) for i in rows])).permute(0, 3, 1, 2)
                chunks.append(self.net(images.to(self.device)).detach().to("cpu", torch.float32))
            out[name] = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)
        return out


# Rows folded into the statistics at a time: bounds the float64 copy (8 MB a chunk at 2048-d).
FOLD_ROWS = 512


def fold(features: dict[str, np.ndarray], groups: list[str]) -> dict[tuple[str, str], FeatureStats]:
    """Statistics per (image set, group) of per-row `features` (rows aligned across sets,
    `groups` naming each row's group, e.g. its mask-area bucket). Statistics are kept per
    group only: a set's overall statistics are the merge of its groups.

    Folded in the rows' order, in fixed chunks: the same rows in the same order give the
    same statistics bit for bit (float64 sums depend on their order in the last bits)."""
    groups_arr = np.asarray(groups, dtype=object)
    stats = {}
    for name, x in features.items():
        for group in sorted(set(groups)):
            rows = x[groups_arr == group]
            key = stats[(name, group)] = FeatureStats.empty(x.shape[1])
            for start in range(0, len(rows), FOLD_ROWS):
                key.update(torch.from_numpy(rows[start:start + FOLD_ROWS]))
    return stats


def fid_table(stats: dict[tuple[str, str], FeatureStats], real: str) -> dict[str, dict]:
    """FID of every set against `real`, overall and per group: {set: {"all": fid, group: fid}}.

    A value is None where either side has fewer than two images (no covariance).
    """
    sets = sorted({name for name, _ in stats if name != real})
    groups = sorted({group for _, group in stats})

    def combined(name: str, only: list[str]) -> FeatureStats | None:
        parts = [stats[(name, g)] for g in only if (name, g) in stats]
        return reduce(FeatureStats.merge, parts) if parts else None

    def distance(a: FeatureStats | None, b: FeatureStats | None) -> float | None:
        if a is None or b is None or a.count < 2 or b.count < 2:
            return None
        return frechet_distance(a, b)

    out = {}
    for name in sets:
        row = {"all": distance(combined(real, groups), combined(name, groups))}
        for group in groups:
            row[group] = distance(combined(real, [group]), combined(name, [group]))
        out[name] = row
    return out
