"""Model presets: which checkpoint each role loads, pinned.

- `paper`: the checkpoints the paper uses, pinned to a revision on the Hugging Face hub.
- `tiny`: random-init, diffusers-test-sized models built offline (tests, CI, the demo).
- `fullsize`: the `paper` architectures with random weights, built offline (GPU benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from blipinpaint.models import offline

# FID on real runs: the standard Inception v3 (pool3, 2048-d, the TensorFlow weights FID
# is defined with; `models.fid_inception`, torch-fidelity's `inception-v3-compat` without
# torchvision). Its weights come from torch-fidelity's pinned release file, through the model
# store like every checkpoint; a local copy of that file can stand in for the URL.
FID_INCEPTION_V3 = "torchmetrics:inception-v3-compat"  # the name predates our own loader; kept for configs
FID_INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                     "weights-inception-2015-12-05-6726825d.pth")
FID_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_WEIGHTS_SUFFIXES = (".pth", ".pt")  # torch-fidelity's release format: a pickled state dict


@dataclass
class ModelRef:
    """A checkpoint: a local folder or folder URI, or a hub id with its pinned revision (commit).

    For a hub id, `files` names the files of that revision the role uses (glob patterns):
    the model store fetches, verifies and converts exactly those (see `models.store`).
    """

    name_or_path: str = ""
    revision: str | None = None
    files: list[str] | None = None


def is_standard_inception(ref: ModelRef) -> bool:
    """Whether `ref` names the standard FID Inception (torch-fidelity's pinned weights)."""
    return ref.name_or_path == FID_INCEPTION_V3


def is_inception_weights_file(ref: ModelRef) -> bool:
    """Whether `ref` names a file of FID Inception weights (torch-fidelity's `.pth`) for the
    model store to take. Told by the name alone: a worker finds the store entry without the
    file, which only the driver reads."""
    return ref.name_or_path.endswith(FID_WEIGHTS_SUFFIXES)


def weights_file_in(folder: Path) -> Path | None:
    """The FID Inception weights file a folder without a config.json holds (e.g. torch's hub
    cache): torch-fidelity's release file by its name, else the folder's only `.pth`/`.pt`.
    None for a model folder, or a folder with no such file or several."""
    if not folder.is_dir() or (folder / "config.json").exists():
        return None
    release = folder / FID_INCEPTION_URL.rsplit("/", 1)[1]
    if release.is_file():
        return release
    found = [p for p in folder.iterdir() if p.is_file() and p.suffix in FID_WEIGHTS_SUFFIXES]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class Preset:
    name: str
    image_size: int  # the resolution the inpainter was trained at
    captioner: ModelRef
    inpainter: ModelRef
    clip: ModelRef
    fid: ModelRef


# The files each role uses at its pinned revision (the repos hold more: TF/Flax weights,
# a single-file .ckpt, the safety checker). tests/data/hub/ keeps the full listings.
TRANSFORMERS_FILES = ["config.json", "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json",
                      "tokenizer_config.json"]
PAPER = Preset(
    name="paper",
    image_size=512,
    # This revision ships its weights as a pickle only (pytorch_model.bin, no safetensors):
    # the model store verifies its sha256 and converts it, so no worker ever reads it.
    captioner=ModelRef("Salesforce/blip-image-captioning-base", "82a37760796d32b1411fe092ab5d4e227313294b",
                       [*TRANSFORMERS_FILES, "vocab.txt", "pytorch_model.bin"]),
    # Full-precision weights exist here only as pickles; the fp16 safetensors are the same
    # weights at half precision (what GPU runs use anyway; fp32 runs upcast them).
    inpainter=ModelRef("stable-diffusion-v1-5/stable-diffusion-inpainting", "8a4288a76071f7280aedbdb3253bdb9e9d5d84bb",
                       ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
                        *(f"{part}/config.json" for part in ("text_encoder", "unet", "vae")),
                        "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                        "vae/diffusion_pytorch_model.fp16.safetensors"]),
    clip=ModelRef("openai/clip-vit-large-patch14", "32bd64288804d66eefd0ccbe215aa642df71cc41",
                  [*TRANSFORMERS_FILES, "vocab.json", "merges.txt", "model.safetensors"]),
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
