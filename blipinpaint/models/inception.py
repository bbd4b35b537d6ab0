"""Inception-style image feature network for FID, loadable like any checkpoint.

Real runs use the standard FID Inception (pool3, 2048-d) through torchmetrics. The
offline presets need a network with the same interface that builds without a download:
uint8 images in, one feature vector per image out, and a `num_features` attribute so
torchmetrics' `FrechetInceptionDistance(feature=...)` accepts it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class InceptionConfig:
    width: int = 16  # channels of the stem; blocks grow from it
    num_blocks: int = 2
    num_features: int = 64
    input_size: int = 64  # images are resized to this square before the stem


class _InceptionBlock(nn.Module):
    """Four parallel branches (1x1, 3x3, two 3x3, pool+1x1) concatenated, as in Inception."""

    def __init__(self, cin: int, branch: int):
        super().__init__()
        self.b1 = nn.Conv2d(cin, branch, 1)
        self.b3 = nn.Sequential(nn.Conv2d(cin, branch, 1), nn.ReLU(), nn.Conv2d(branch, branch, 3, padding=1))
        self.b5 = nn.Sequential(
            nn.Conv2d(cin, branch, 1), nn.ReLU(),
            nn.Conv2d(branch, branch, 3, padding=1), nn.ReLU(),
            nn.Conv2d(branch, branch, 3, padding=1),
        )
        self.bp = nn.Conv2d(cin, branch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1)
        out = torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(pooled)], dim=1)
        return F.max_pool2d(F.relu(out), 2)


class InceptionFeatures(nn.Module):
    """uint8 (B, 3, H, W) -> float32 (B, num_features): the interface FID needs."""

    def __init__(self, config: InceptionConfig):
        super().__init__()
        self.config = config
        self.num_features = config.num_features
        self.stem = nn.Sequential(nn.Conv2d(3, config.width, 3, stride=2, padding=1), nn.ReLU())
        blocks, cin = [], config.width
        for i in range(config.num_blocks):
            branch = config.width * 2**i
            blocks.append(_InceptionBlock(cin, branch))
            cin = 4 * branch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, config.num_features)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionFeatures expects uint8 images, got {images.dtype}")
        x = images.float() / 127.5 - 1.0
        x = F.interpolate(x, size=(self.config.input_size,) * 2, mode="bilinear", align_corners=False)
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_file(self.state_dict(), str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> InceptionFeatures:
        directory = Path(directory)
        config = InceptionConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.eval()
