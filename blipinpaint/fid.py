"""FID at scale: mergeable feature statistics, and the Fréchet distance taken once.

Each worker folds the features of its shard into `FeatureStats` (count, sum, sum of
outer products, in float64); statistics of shards add up, so the driver merges them and
computes the distance once: the same number a single pass over all images gives.
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


class FidAccumulator:
    """A worker's share of FID: PNG image columns -> feature statistics per (image set, group).

    `sets` maps a set name (e.g. "ground_truth", "baseline") to its PNG column; `group`
    names each row's group (e.g. its mask-area bucket). Statistics are kept per group only:
    a set's overall statistics are the merge of its groups. Each row's features are kept
    too (`ids`, `features`: float32, 8 KB a set per sample at 2048-d), for the bootstrap
    intervals (`fid_draw`).
    """

    def __init__(self, net: torch.nn.Module, device: torch.device, sets: dict[str, str]):
        self.net, self.device, self.sets = net, device, sets
        self.stats: dict[tuple[str, str], FeatureStats] = {}
        self.ids: list[str] = []
        self.kept: dict[str, list[torch.Tensor]] = {}

    @torch.inference_mode()
    def update(self, batch: dict[str, np.ndarray], groups: list[str]) -> None:
        self.ids.extend(str(i) for i in batch.get("id", [""] * len(groups)))
        for name, column in self.sets.items():
            # Decoded PNG, uint8 (B, 3, H, W): the exact pixels that were scored.
            images = torch.from_numpy(np.stack([decode_png(b) for b in batch[column]])).permute(0, 3, 1, 2)
            features = self.net(images.to(self.device))
            self.kept.setdefault(name, []).append(features.detach().to("cpu", torch.float32))
            for group in sorted(set(groups)):
                rows = torch.tensor([g == group for g in groups])
                key = (name, group)
                if key not in self.stats:
                    self.stats[key] = FeatureStats.empty(features.shape[1])
                self.stats[key].update(features[rows.to(features.device)])


    @property
    def features(self) -> dict[str, np.ndarray]:
        """Each set's per-row features, in the order of `ids`."""
        return {name: torch.cat(parts).numpy() for name, parts in self.kept.items()}


def merge_all(parts: list[dict[tuple[str, str], FeatureStats]]) -> dict[tuple[str, str], FeatureStats]:
    """Merge the statistics of every worker, key by key."""
    keys = {key for part in parts for key in part}
    return {key: reduce(FeatureStats.merge, [p[key] for p in parts if key in p]) for key in keys}


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
