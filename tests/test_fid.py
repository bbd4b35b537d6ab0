import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from blipinpaint.fid import FeatureStats, FidFeatures, fid_draw, fid_table, fold, frechet_distance
from blipinpaint.io import encode_png
from blipinpaint.models.inception import InceptionConfig, InceptionFeatures


def stats_of(features: torch.Tensor) -> FeatureStats:
    s = FeatureStats.empty(features.shape[1])
    s.update(features)
    return s


def images(n: int, seed: int, shift: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=(n, 3, 32, 32))
    return torch.from_numpy(np.clip(base + shift, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return InceptionFeatures(InceptionConfig(width=8, num_features=16, input_size=32)).eval()


def test_merged_shards_equal_torchmetrics_single_pass(net):
    real, fake = images(40, 1), images(40, 2, shift=40)
    reference = FrechetInceptionDistance(feature=net)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    expected = float(reference.compute())

    with torch.no_grad():
        fr, ff = net(real), net(fake)
    # Three uneven shards per side, merged in another order than they were made.
    real_parts = [stats_of(fr[:7]), stats_of(fr[7:30]), stats_of(fr[30:])]
    fake_parts = [stats_of(ff[:19]), stats_of(ff[19:20]), stats_of(ff[20:])]
    merged_real = real_parts[2].merge(real_parts[0]).merge(real_parts[1])
    merged_fake = fake_parts[1].merge(fake_parts[2]).merge(fake_parts[0])
    assert merged_real.count == 40
    assert frechet_distance(merged_real, merged_fake) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(stats_of(fr), stats_of(ff)) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(500, 8)))
    assert frechet_distance(stats_of(x), stats_of(x)) == pytest.approx(0, abs=1e-8)
    distances = [frechet_distance(stats_of(x), stats_of(x + shift)) for shift in (0.1, 0.5, 2.0)]
    assert distances == sorted(distances) and distances[0] > 0
    # A pure mean shift by s in every one of 8 dimensions: FID = 8 s².
    assert distances[2] == pytest.approx(8 * 2.0**2, rel=1e-6)


def test_covariance_needs_two_vectors():
    with pytest.raises(ValueError, match="at least 2"):
        stats_of(torch.ones(1, 4)).mean_cov()


def test_features_fold_per_group_into_the_table(net):
    """Rows in two groups: per-group FIDs, and `all` from the merged groups; the network sees
    the rows in chunks of the batch size, in id order."""
    gt, fake = images(12, 3), images(12, 4, shift=60)
    png = lambda t: np.array([encode_png(i.permute(1, 2, 0).numpy()) for i in t], dtype=object)  # noqa: E731
    ids = np.array([f"s{i:02d}" for i in range(12)], dtype=object)
    batch = {"id": ids, "gt_png": png(gt), "fake_png": png(fake)}
    groups = ["small"] * 5 + ["large"] * 7
    out = FidFeatures(net, torch.device("cpu"), {"real": "gt_png", "fake": "fake_png"}, batch_size=6)(batch)
    assert list(out["id"]) == list(ids) and out["real"].shape == (12, 16)
    table = fid_table(fold({k: out[k] for k in ("real", "fake")}, groups), real="real")

    # The features of one pass, in the stage's chunks: float32 convolutions round differently
    # at another batch size, and this tiny network's FID is so near zero that the last bits
    # of the features decide its digits. What is compared is the folding.
    with torch.no_grad():
        fg, ff = (torch.cat([net(t[:6]), net(t[6:])]) for t in (gt, fake))
    assert table["fake"]["all"] == pytest.approx(frechet_distance(stats_of(fg), stats_of(ff)), rel=1e-6)
    assert table["fake"]["small"] == pytest.approx(frechet_distance(stats_of(fg[:5]), stats_of(ff[:5])), rel=1e-6)
    assert set(table) == {"fake"}


def test_features_depend_on_the_ids_alone_not_on_the_order_rows_arrive_in(net):
    """A part done again after a lost worker may arrive in another order: the stage sorts its
    rows by id before chunking them, so its features are the same bit for bit, and so the
    folded statistics (issue 35: a node loss must not change the report's figures)."""
    gt = images(10, 6)
    png = np.array([encode_png(i.permute(1, 2, 0).numpy()) for i in gt], dtype=object)
    ids = np.array([f"s{i}" for i in range(10)], dtype=object)
    stage = FidFeatures(net, torch.device("cpu"), {"real": "a"}, batch_size=4)
    shuffled = np.random.default_rng(1).permutation(10)
    first, again = stage({"id": ids, "a": png}), stage({"id": ids[shuffled], "a": png[shuffled]})
    assert list(again["id"]) == list(first["id"]) and np.array_equal(again["real"], first["real"])
    stats = [fold({"real": f["real"]}, ["g"] * 10)[("real", "g")] for f in (first, again)]
    assert torch.equal(stats[0].outer, stats[1].outer) and torch.equal(stats[0].total, stats[1].total)


def test_a_group_with_one_image_has_no_fid(net):
    gt = images(3, 5)
    png = np.array([encode_png(i.permute(1, 2, 0).numpy()) for i in gt], dtype=object)
    out = FidFeatures(net, torch.device("cpu"), {"real": "a", "fake": "b"}, batch_size=2)(
        {"id": np.array(["x", "y", "z"], dtype=object), "a": png, "b": png})
    table = fid_table(fold({k: out[k] for k in ("real", "fake")}, ["one", "two", "two"]), real="real")
    assert table["fake"]["one"] is None and table["fake"]["two"] is not None


def test_fid_from_per_sample_features_on_a_draw_of_rows():
    """`fid_draw` (the bootstrap's FID) equals the mergeable statistics' FID on all rows, and
    a draw with repeats takes the FID of exactly those rows."""
    rng = np.random.default_rng(0)
    real = torch.as_tensor(rng.normal(size=(40, 6)))
    other = torch.as_tensor(rng.normal(1.0, 2.0, size=(40, 6)))

    def stats(x):
        s = FeatureStats.empty(x.shape[1])
        s.update(x)
        return s

    features = {"real": real, "shifted": real + 0.5, "other": other}
    full = fid_draw(features, "real")
    assert full["other"] == pytest.approx(frechet_distance(stats(real), stats(other)), rel=1e-9)
    assert full["shifted"] == pytest.approx(6 * 0.25, abs=1e-9)  # same covariance: the mean's shift alone
    index = torch.as_tensor(rng.integers(0, 40, size=40))
    draw = fid_draw(features, "real", index)
    assert draw["other"] == pytest.approx(frechet_distance(stats(real[index]), stats(other[index])), rel=1e-9)
    assert draw["shifted"] == pytest.approx(1.5, abs=1e-9)
