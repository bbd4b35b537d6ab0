"""Bootstrap intervals on data whose answer is known."""

import numpy as np
import pytest

from blipinpaint.bootstrap import mean_intervals, resamples, statistic_intervals


def test_a_constant_difference_has_a_zero_width_interval():
    base = np.random.default_rng(0).normal(30, 5, size=200)
    out = mean_intervals({"delta": (base + 2.5) - base}, replicates=500, seed=1, confidence=0.95)["delta"]
    assert (out["estimate"], out["low"], out["high"]) == pytest.approx((2.5, 2.5, 2.5))
    assert out["n"] == 200


def test_a_normal_sample_gives_the_textbook_interval():
    """Mean ± 1.96 s/√n: the percentile bootstrap of a mean of 2,000 normal values agrees within
    a few per cent of the interval's width."""
    x = np.random.default_rng(7).normal(1.0, 2.0, size=2000)
    out = mean_intervals({"x": x}, replicates=4000, seed=3, confidence=0.95)["x"]
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert out["estimate"] == pytest.approx(x.mean())
    assert out["low"] == pytest.approx(x.mean() - half, abs=0.06 * half)
    assert out["high"] == pytest.approx(x.mean() + half, abs=0.06 * half)
    # The normal interval from the draws' spread: the same textbook interval, centred on the estimate.
    normal = statistic_intervals(lambda i: {"x": float(x.mean() if i is None else x[i].mean())}, len(x),
                                 replicates=2000, seed=3, confidence=0.95, normal=True)["x"]
    assert (normal["low"], normal["high"]) == pytest.approx((x.mean() - half, x.mean() + half), abs=0.06 * half)
    narrow = mean_intervals({"x": x}, replicates=4000, seed=3, confidence=0.5)["x"]
    assert narrow["high"] - narrow["low"] < 0.4 * (out["high"] - out["low"])  # 0.674/1.96 of it


def test_draws_are_seeded_and_shared_by_every_statistic():
    x = np.random.default_rng(1).normal(size=50)
    first = mean_intervals({"x": x, "double": 2 * x}, replicates=100, seed=5, confidence=0.9)
    assert first == mean_intervals({"x": x, "double": 2 * x}, replicates=100, seed=5, confidence=0.9)
    # The same draws: each bound of 2x is twice that of x.
    assert first["double"]["low"] == pytest.approx(2 * first["x"]["low"])
    other = mean_intervals({"x": x}, replicates=100, seed=6, confidence=0.9)["x"]
    assert other["low"] != first["x"]["low"]
    # A whole-set statistic sees those draws too: its interval of the mean is the same.
    whole = statistic_intervals(lambda i: {"mean": float(x.mean() if i is None else x[i].mean())}, len(x),
                                replicates=100, seed=5, confidence=0.9)["mean"]
    assert (whole["low"], whole["high"]) == pytest.approx((first["x"]["low"], first["x"]["high"]))
    assert sum(len(block) for block in resamples(50, 100, 5)) == 100


def test_an_infinite_value_leaves_its_sample_out_of_that_column_only():
    psnr = np.array([20.0, 22.0, np.inf, 24.0])
    out = mean_intervals({"psnr": psnr, "ssim": np.array([0.5, 0.6, 1.0, 0.7])}, replicates=200, seed=0,
                         confidence=0.95)
    assert out["psnr"]["n"] == 3 and out["psnr"]["estimate"] == pytest.approx(22.0)
    assert 20.0 <= out["psnr"]["low"] <= out["psnr"]["high"] <= 24.0
    assert out["ssim"]["n"] == 4
    single = mean_intervals({"psnr": np.array([np.inf, 21.0])}, replicates=50, seed=0, confidence=0.95)["psnr"]
    assert single == {"estimate": 21.0, "low": None, "high": None, "n": 1}
