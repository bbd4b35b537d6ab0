"""Per-sample seeds: every random choice derives from (global seed, sample id, purpose).

A sample's mask and diffusion noise then depend on nothing else: not on batch
composition, worker, retry or order, so a rerun reproduces every row.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def sample_seed(seed: int, sample_id: str, purpose: str) -> int:
    """A 63-bit seed (fits int64 columns and `torch.Generator.manual_seed`)."""
    digest = hashlib.blake2b(f"{seed}\x00{purpose}\x00{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_rng(seed: int, sample_id: str, purpose: str) -> np.random.Generator:
    return np.random.default_rng(sample_seed(seed, sample_id, purpose))


def heldout(seed: int, sample_id: str, fraction: float) -> bool:
    """Whether a sample is in the held-out split: a stable hash, not row order."""
    return sample_seed(seed, sample_id, "split") < fraction * 2**63


def raised_fraction(seed: int, ids, fraction: float, at_least: int = 2) -> float:
    """`fraction`, raised just enough that at least `at_least` of `ids` are held out, as long
    as at least as many remain for training: on a small dataset a plain hash split can hold
    out one sample or none, and R² and FID need two. The hash order is kept, so the raised
    split only adds samples to the plain one."""
    return raised_fraction_of(np.array([sample_seed(seed, i, "split") for i in set(ids)], np.uint64), fraction,
                              at_least)


def raised_fraction_of(scores: np.ndarray, fraction: float, at_least: int = 2) -> float:
    """`raised_fraction` given the split's hash of each distinct id (`split_scores`)."""
    if len(scores) < 2 * at_least:
        return fraction
    lowest = sorted(int(s) for s in np.partition(scores, at_least)[:at_least + 1])
    if lowest[at_least - 1] < fraction * 2**63:
        return fraction
    return (lowest[at_least - 1] + lowest[at_least]) / 2 / 2**63


def split_scores(seed: int, ids, block: int = 1 << 16) -> np.ndarray:
    """The split's hash (`heldout`'s) of each of `ids` (an Arrow string array), as one uint64
    array: the ids made Python strings a block at a time, never all at once."""
    scores = np.empty(len(ids), np.uint64)
    for start in range(0, len(ids), block):
        chunk = ids.slice(start, block).to_pylist()
        scores[start:start + len(chunk)] = [sample_seed(seed, i, "split") for i in chunk]
    return scores


def scores_below(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Which `scores` are held out at `fraction`: `heldout`'s `score < fraction * 2**63`, the
    float bound made the least integer above it so that the comparison stays exact in uint64."""
    bound = fraction * 2**63
    return scores < np.uint64(min(math.ceil(bound), 2**64 - 1))
