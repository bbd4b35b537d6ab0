"""The standard FID Inception v3 (pool3, 2048-d), without torchvision or torch-fidelity.

FID is defined by one network: the TensorFlow Inception v3 of 2015-12-05 that the original
FID code runs, with its TensorFlow 1.x bilinear resize to 299x299. torch-fidelity's
`inception-v3-compat` feature extractor reproduces it in PyTorch, and its release file
(`presets.FID_INCEPTION_URL`, pinned by sha256) holds those weights as a state dict. This
module builds the same network with the same state-dict keys, so the same file loads into
it, and needs only torch: torch-fidelity imports torchvision, whose wheel must match the
CUDA build of torch (on CPU machines it cannot be imported at all), and CI must run the
loader a cluster runs.

What makes it that network, beyond the layer shapes, is in three places: the resize
(`resize_like_tf1`: TensorFlow 1.x's `resize_bilinear` without half-pixel centres or
antialiasing), the input scaling `(x - 128) / 128`, and TensorFlow's pooling quirks (the
average pools leave padding out of their mean; the last block pools by max, not average).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's name for this network
INPUT_SIZE = 299
NUM_FEATURES = 2048  # pool3
WEIGHTS_NAME = "model.safetensors"

# The config.json of a folder that holds this network (what the model store writes).
CONFIG = {"feature_extractor": FEATURE_EXTRACTOR, "num_features": NUM_FEATURES,
          "resize": f"to {INPUT_SIZE}x{INPUT_SIZE}, bilinear as TensorFlow 1.x (no antialiasing)"}


def resize_like_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, size, size), as TensorFlow 1.x's `resize_bilinear` with
    `align_corners=False`: output pixel i samples input coordinate i * (in / out) (no
    half-pixel offset, unlike torch's `interpolate`), clamped at the last row and column.

    The coordinates are computed in float32, as TensorFlow does: FID's numbers depend on it.
    """
    rows_lo, rows_hi, rows_frac = _taps(x.shape[2], size, x.device)
    cols_lo, cols_hi, cols_frac = _taps(x.shape[3], size, x.device)
    top, bottom = x.index_select(2, rows_lo), x.index_select(2, rows_hi)

    def across(rows: torch.Tensor) -> torch.Tensor:
        left, right = rows.index_select(3, cols_lo), rows.index_select(3, cols_hi)
        return left + (right - left) * cols_frac.view(1, 1, 1, size).to(x.dtype)

    upper, lower = across(top), across(bottom)
    return upper + (lower - upper) * rows_frac.view(1, 1, size, 1).to(x.dtype)


def _taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output index: the input index below, the one above (clamped) and the weight of the latter."""
    where = torch.arange(n_out, dtype=torch.float32, device=device) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = where.long()  # non-negative: truncation is the floor
    return lo, (lo + 1).clamp_max(n_in - 1), where - lo.float()


class _Conv(nn.Module):
    """Convolution without bias, batch norm (TensorFlow's epsilon), ReLU: every layer of the net."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 average pool with SAME padding averages over the pixels inside the image.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


class _BlockA(nn.Module):
    """35x35: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | pool -> 1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _BlockB(nn.Module):
    """35x35 -> 17x17: strided 3x3 | 1x1 -> 3x3 -> strided 3x3 | strided max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _BlockC(nn.Module):
    """17x17 with factorised 7x7 convolutions (1x7 and 7x1), `c7` channels inside."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, **row)
        self.branch7x7_3 = _Conv(c7, 192, **col)
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, **col)
        self.branch7x7dbl_3 = _Conv(c7, c7, **row)
        self.branch7x7dbl_4 = _Conv(c7, c7, **col)
        self.branch7x7dbl_5 = _Conv(c7, 192, **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(_avg_pool(x))], 1)


class _BlockD(nn.Module):
    """17x17 -> 8x8: 1x1 -> strided 3x3 | 1x1 -> 1x7 -> 7x1 -> strided 3x3 | strided max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = layer(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    """8x8 with split 1x3 / 3x1 outputs; `pool` is the pooling branch's (TensorFlow's last block
    pools by max where the paper's architecture averages: the FID network keeps that)."""

    def __init__(self, cin: int, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(three), self.branch3x3_2b(three),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(self.pool(x)),
        ], 1)


class FidInceptionV3(nn.Module):
    """uint8 (B, 3, H, W) -> float32 (B, 2048) pool3 features, in fp32, always in eval mode.

    Submodule names are torch-fidelity's, so its release file's state dict loads as it is
    (`fc`, the classifier, is kept for that; FID never runs it).
    """

    num_features = NUM_FEATURES

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, c7=128)
        self.Mixed_6c = _BlockC(768, c7=160)
        self.Mixed_6d = _BlockC(768, c7=160)
        self.Mixed_6e = _BlockC(768, c7=192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, pool=_avg_pool)
        self.Mixed_7c = _BlockE(2048, pool=_max_pool)
        self.fc = nn.Linear(NUM_FEATURES, 1008)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FidInceptionV3:
        """Never in training mode: batch norm must use the stored statistics."""
        return super().train(False)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> the network's input: resized to 299x299 as TensorFlow 1.x, scaled to [-1, 1)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FID Inception expects uint8 images (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        return (resize_like_tf1(images.float(), INPUT_SIZE) - 128) / 128

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """The prepared input (B, 3, 299, 299) -> the 2048-d average of the last block."""
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool3(self.prepare(images))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> FidInceptionV3:
        """The network with the weights of `folder`'s `model.safetensors` (torch-fidelity's keys)."""
        state = load_file(str(Path(folder) / WEIGHTS_NAME))
        problems = state_problems(state)
        if problems:
            raise ValueError(f"{folder}: not the FID Inception's weights: {'; '.join(problems)}")
        model = cls()
        # A release file has no `num_batches_tracked` (the converter from TensorFlow writes
        # weights and statistics only); batch norm fills it in, as it did for torch-fidelity.
        model.load_state_dict(state)
        return model.eval()


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Each weight of the network and its shape, as torch-fidelity's state dict has them (built
    on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = FidInceptionV3()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def state_problems(state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading into the network: missing, unexpected or misshapen
    weights (a few named of each), or weights that are not floating point. [] when it loads."""
    expected = expected_shapes()
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    problems = []
    for what, names in (("missing", sorted(expected.keys() - given.keys())),
                        ("unexpected", sorted(given.keys() - expected.keys())),
                        ("misshapen", sorted(k for k in expected.keys() & given.keys()
                                             if tuple(given[k].shape) != expected[k]))):
        if names:
            problems.append(f"{len(names)} {what} weights ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    if not problems and not all(v.is_floating_point() for v in given.values()):
        problems.append("weights that are not floating point")
    return problems


def write_config(folder: Path, weights: str) -> None:
    """The folder's config.json: this network, and where its weights came from (a note only)."""
    (folder / "config.json").write_text(json.dumps({**CONFIG, "weights": weights}, indent=2))
