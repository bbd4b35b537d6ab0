"""Bootstrap confidence intervals over samples: seeded, paired.

Every statistic of one evaluation is resampled with the same draws of sample indices
(`resamples`), so the intervals of a difference between variants (BLIP − baseline,
fine-tuned − BLIP) are paired: a sample's two inpaintings stay together in every draw.

Means get the percentile interval. FID is biased in the number of images, and a draw
(with repeats) holds fewer distinct images than the sample, so its draws sit above the
estimate, often all of them; its interval is the normal one, the estimate ± z times the
draws' standard deviation (`statistic_intervals(..., normal=True)`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from statistics import NormalDist

import numpy as np

CHUNK = 64  # draws per block of indices: (CHUNK, n) int64 stays small on large evaluations


def resamples(n: int, replicates: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of `replicates` draws of n sample indices with replacement, from `seed`."""
    rng = np.random.default_rng(seed)
    for start in range(0, replicates, CHUNK):
        yield rng.integers(0, n, size=(min(CHUNK, replicates - start), n))


def interval(estimate: float, draws: np.ndarray, confidence: float, normal: bool = False) -> dict:
    """The percentile interval of a statistic's bootstrap `draws` around its `estimate`; or,
    `normal`, the estimate ± z · the draws' standard deviation."""
    if normal:
        half = NormalDist().inv_cdf((1 + confidence) / 2) * float(np.std(draws, ddof=1))
        low, high = estimate - half, estimate + half
    else:
        low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"estimate": float(estimate), "low": float(low), "high": float(high)}


def mean_intervals(columns: dict[str, np.ndarray], replicates: int, seed: int, confidence: float) -> dict[str, dict]:
    """The mean of each column (one value per sample, rows aligned across columns) with its
    bootstrap interval, every column resampled with the same draws.

    A non-finite value (PSNR of a perfectly restored hole is infinite, and so is a
    difference of two) leaves its sample out of that column only; `n` counts the rest.
    """
    n = len(next(iter(columns.values())))
    finite = {name: np.isfinite(np.asarray(v, dtype=np.float64)) for name, v in columns.items()}
    values = {name: np.where(finite[name], np.asarray(v, dtype=np.float64), 0.0) for name, v in columns.items()}
    draws: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    for index in resamples(n, replicates, seed):
        for name in columns:
            kept = finite[name][index].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                draws[name].append(values[name][index].sum(axis=1) / kept)
    out = {}
    for name in columns:
        count = int(finite[name].sum())
        if count < 2:  # no spread to resample
            out[name] = {"estimate": float(values[name].sum() / count) if count else None, "low": None, "high": None,
                         "n": count}
            continue
        d = np.concatenate(draws[name])
        out[name] = {**interval(values[name].sum() / count, d[np.isfinite(d)], confidence), "n": count}
    return out


def statistic_intervals(statistic: Callable[[np.ndarray | None], dict[str, float]], n: int, replicates: int,
                        seed: int, confidence: float, normal: bool = False) -> dict[str, dict]:
    """Statistics of the whole sample set (e.g. FID of each variant, and their differences),
    each with its bootstrap interval (`interval`): `statistic(None)` on every sample,
    `statistic(index)` on one draw of sample indices (the draws `mean_intervals` makes with
    the same seed)."""
    estimates = statistic(None)
    draws = [statistic(row) for index in resamples(n, replicates, seed) for row in index]
    return {name: {**interval(value, np.asarray([d[name] for d in draws]), confidence, normal), "n": n}
            for name, value in estimates.items()}
