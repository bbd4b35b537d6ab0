"""Model presets: which checkpoint each role loads, pinned.

- `paper`: the checkpoints the paper uses, pinned to a revision on the Hugging Face hub.
- `tiny`: random-init, diffusers-test-sized models built offline (tests, CI, the demo).
- `fullsize`: the `paper` architectures with random weights, built offline (GPU benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from blipinpaint.models import offline

# FID on real runs: torchmetrics' standard Inception v3 (pool3, 2048-d, the weights FID
# is defined with). It needs the `fid` extra (torch-fidelity) and fetches its weights once.
FID_INCEPTION_V3 = "torchmetrics:inception-v3-compat"


@dataclass
class ModelRef:
    """A checkpoint: a local folder, or a hub id with its pinned revision (commit)."""

    name_or_path: str = ""
    revision: str | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    image_size: int  # the resolution the inpainter was trained at
    captioner: ModelRef
    inpainter: ModelRef
    clip: ModelRef
    fid: ModelRef


PAPER = Preset(
    name="paper",
    image_size=512,
    captioner=ModelRef("Salesforce/blip-image-captioning-base", "82a37760796d32b1411fe092ab5d4e227313294b"),
    inpainter=ModelRef("stable-diffusion-v1-5/stable-diffusion-inpainting", "8a4288a76071f7280aedbdb3253bdb9e9d5d84bb"),
    clip=ModelRef("openai/clip-vit-large-patch14", "32bd64288804d66eefd0ccbe215aa642df71cc41"),
    fid=ModelRef(FID_INCEPTION_V3),
)

PRESET_NAMES = ("tiny", "paper", "fullsize")


def get_preset(name: str, cache: Path | None = None) -> Preset:
    """Resolve a preset; offline presets are built into the cache on first use."""
    if name == "paper":
        return PAPER
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown model preset {name!r}; choose one of {list(PRESET_NAMES)}")
    folder = offline.ensure_built(name, cache)
    refs = {role: ModelRef(str(folder / role)) for role in offline.COMPONENTS}
    return Preset(name=name, image_size=offline.SPECS[name].image_size, **refs)


def native_image_size(name: str) -> int:
    """A preset's resolution, known without building or downloading anything."""
    return PAPER.image_size if name == "paper" else offline.SPECS[name].image_size


def with_overrides(preset: Preset, **refs: ModelRef | None) -> Preset:
    """The preset with some roles pointed elsewhere (e.g. a fine-tuned BLIP folder)."""
    return replace(preset, **{role: ref for role, ref in refs.items() if ref is not None and ref.name_or_path})
