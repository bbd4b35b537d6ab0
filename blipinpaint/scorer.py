"""The scoring network: caption features -> predicted SSIM, PSNR and CLIP score.

It stands in for the non-differentiable caption -> inpainting -> metrics path, so BLIP
can be fine-tuned through it. Targets are standardised with the training split's mean
and spread (PSNR is ~10-40 dB, SSIM 0-1): the network learns all three on one scale and
`destandardize` maps its outputs back to metric units for the loss.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

TARGETS = ("ssim", "psnr", "clip_score")  # the caption-guided variant's metrics
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ScoreNetConfig:
    in_features: int
    hidden: tuple[int, ...] = (512, 256)
    targets: tuple[str, ...] = TARGETS
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)  # of each target on the training split
    std: tuple[float, ...] = (1.0, 1.0, 1.0)


class ScoreNet(nn.Module):
    """An MLP; outputs are standardised targets (see `destandardize`)."""

    def __init__(self, config: ScoreNetConfig):
        super().__init__()
        self.config = config
        layers, width = [], config.in_features
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        layers.append(nn.Linear(width, len(config.targets)))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)

    def set_standardization(self, mean: list[float], std: list[float]) -> None:
        """The training split's statistics of each target, for the buffers and the saved config."""
        self.config.mean, self.config.std = tuple(mean), tuple(std)
        self.mean.copy_(torch.tensor(mean))
        self.std.copy_(torch.tensor(std))

    def standardize(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets - self.mean) / self.std

    def destandardize(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs * self.std + self.mean

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ScoreNet:
        directory = Path(directory)
        raw = json.loads((directory / CONFIG_NAME).read_text())
        config = ScoreNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.eval()


def regression_report(pred: torch.Tensor, true: torch.Tensor, train_mean: torch.Tensor,
                      targets: tuple[str, ...] = TARGETS) -> dict[str, dict[str, float]]:
    """MAE and R² per target, of the predictions and of predicting the training mean."""
    from torchmetrics.functional import mean_absolute_error, r2_score  # the driver's report only: not in workers

    baseline = train_mean.expand_as(true)
    report = {}
    for j, name in enumerate(targets):
        report[name] = {
            "mae": mean_absolute_error(pred[:, j], true[:, j]).item(),
            "r2": r2_score(pred[:, j], true[:, j]).item(),
            "mae_mean_baseline": mean_absolute_error(baseline[:, j], true[:, j]).item(),
            "r2_mean_baseline": r2_score(baseline[:, j], true[:, j]).item(),
        }
    return report
