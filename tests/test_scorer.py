import pytest
import torch

from blipinpaint.scorer import ScoreNet, ScoreNetConfig, regression_report


def test_standardisation_round_trips_and_survives_saving(tmp_path):
    net = ScoreNet(ScoreNetConfig(in_features=8, hidden=(4,), mean=(0.5, 20.0, 25.0), std=(0.1, 5.0, 3.0)))
    y = torch.tensor([[0.6, 25.0, 22.0]])
    assert torch.allclose(net.standardize(y), torch.tensor([[1.0, 1.0, -1.0]]))
    assert torch.allclose(net.destandardize(net.standardize(y)), y)
    net.save_pretrained(tmp_path)
    again = ScoreNet.from_pretrained(tmp_path)
    x = torch.randn(3, 8)
    assert torch.equal(again(x), net(x)) and again.config == net.config


def test_regression_report_against_the_mean():
    true = torch.tensor([[0.0, 1.0, 2.0], [2.0, 3.0, 4.0]]).T  # 3 rows, 2 targets
    report = regression_report(true.clone(), true, train_mean=torch.tensor([1.0, 3.0]), targets=("a", "b"))
    assert report["a"]["mae"] == 0 and report["a"]["r2"] == pytest.approx(1.0)
    assert report["a"]["mae_mean_baseline"] == pytest.approx(2 / 3) and report["a"]["r2_mean_baseline"] == 0
