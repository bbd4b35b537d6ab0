"""Load each role's model from a `ModelRef`: a local folder, or a folder URI (the model store).

Every load goes through `from_pretrained` with `use_safetensors=True` (a pickle checkpoint
is refused) and never with `trust_remote_code`. Hub checkpoints are never loaded from the
hub here: the model store (`blipinpaint.models.store`) fetched, verified and converted them
once, and workers load the store's folders. Models load on the CPU in fp32 unless the
caller asks otherwise; device and dtype are always explicit.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from blipinpaint.models.inception import InceptionFeatures
from blipinpaint.models.presets import ModelRef
from blipinpaint.models.store import STANDARD_INCEPTION
from blipinpaint.storage import filesystem, is_remote, local_dir

# transformers is imported by the loader that needs it: a process that only reads a config
# or picks a device should not pay its import (seconds, in every Ray worker).
if TYPE_CHECKING:
    from transformers import BlipForConditionalGeneration, BlipImageProcessorPil, CLIPImageProcessorPil, CLIPModel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_device(name: str) -> torch.device:
    """`cpu` or `cuda[:i]`; asking for CUDA where there is none is an error, not a fallback."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"models.device={name!r} but this worker has no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"models.device must be 'cpu' or 'cuda', got {name!r}")
    return device


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a config dtype string to torch; fp16 is for CUDA only (bf16 runs on CPU and GPU)."""
    if name not in DTYPES:
        raise ValueError(f"models.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("models.dtype=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return DTYPES[name]


def model_folder(ref: ModelRef) -> str:
    """The local folder to load `ref` from: itself, or this node's copy of a folder URI."""
    name = ref.name_or_path
    if is_remote(name):
        return local_dir(name)
    if Path(filesystem(name)[1]).is_dir():  # a path, or a file:// URI
        return filesystem(name)[1]
    raise ValueError(f"model {name!r} is not a local folder or a folder URI: hub checkpoints reach workers "
                     "through the model store (python -m rayjobs.models)")


def _source(ref: ModelRef) -> dict:
    return {"pretrained_model_name_or_path": model_folder(ref)}


@dataclass
class CaptionerModel:
    model: BlipForConditionalGeneration
    image_processor: BlipImageProcessorPil
    tokenizer: object


@dataclass
class ClipModel:
    model: CLIPModel
    image_processor: CLIPImageProcessorPil
    tokenizer: object


def _quiet_transformers() -> None:
    """No loading bars: workers load, and in a job's log a bar is a line per redraw."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def load_captioner(ref: ModelRef, device: torch.device, dtype: torch.dtype = torch.float32,
                   decoder_dtype: torch.dtype | None = None) -> CaptionerModel:
    """BLIP in `dtype`, its text decoder in `decoder_dtype` (default: `dtype` too).

    Two precisions load the checkpoint in fp32 and cast each part from there: a decoder
    loaded in half precision and cast up would have lost what a fine-tune's fp32 weights hold.
    """
    from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipImageProcessorPil

    _quiet_transformers()
    src = _source(ref)
    mixed = decoder_dtype is not None and decoder_dtype != dtype
    model = BlipForConditionalGeneration.from_pretrained(**src, dtype=torch.float32 if mixed else dtype,
                                                         use_safetensors=True)
    if mixed:  # BLIP is these two parts; each cast once, from fp32
        model.vision_model.to(dtype)
        model.text_decoder.to(decoder_dtype)
    return CaptionerModel(
        model=model.to(device).eval(),
        # The PIL processor: the default one needs torchvision, which is not a dependency.
        image_processor=BlipImageProcessorPil.from_pretrained(**src),
        tokenizer=AutoTokenizer.from_pretrained(**src),
    )


def load_clip(ref: ModelRef, device: torch.device, dtype: torch.dtype = torch.float32) -> ClipModel:
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    _quiet_transformers()
    src = _source(ref)
    model = CLIPModel.from_pretrained(**src, dtype=dtype, use_safetensors=True)
    return ClipModel(
        model=model.to(device).eval(),
        image_processor=CLIPImageProcessorPil.from_pretrained(**src),
        tokenizer=AutoTokenizer.from_pretrained(**src),
    )


def load_inpaint_pipeline(ref: ModelRef, device: torch.device, dtype: torch.dtype = torch.float32):
    from diffusers import StableDiffusionInpaintPipeline  # heavy import, only where inpainting runs
    from diffusers.utils import logging as diffusers_logging

    _quiet_transformers()
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components", per worker
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        **_source(ref), dtype=dtype, use_safetensors=True,
        # Scoring-data generation needs raw outputs; the checker would blank images at random.
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)  # one bar per batch would flood the job log
    return pipe.to(device)


def load_fid_features(ref: ModelRef, device: torch.device) -> torch.nn.Module:
    """An uint8-image -> feature network with `num_features`, as torchmetrics' FID expects."""
    folder = Path(model_folder(ref))
    config = json.loads((folder / "config.json").read_text())
    if config.get("feature_extractor") == STANDARD_INCEPTION["feature_extractor"]:
        return _standard_inception(folder).to(device).eval()
    return InceptionFeatures.from_pretrained(folder).to(device)


@contextlib.contextmanager
def _weights_only_loads():
    """Every `torch.load` in this block reads tensors only, whatever its caller asked for.

    Process-wide while it lasts (torch reads the variable at each load): it only ever makes
    a load stricter, and an actor builds its model before it runs anything else."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _standard_inception(folder: Path) -> torch.nn.Module:
    """torchmetrics' FID Inception with the store's weights, resizing as standard FID does.

    torchmetrics resizes with antialiasing by default, which its docs note differs from the
    original FID; `antialias=False` resizes like TensorFlow 1.x, as torch-fidelity and the
    published FID numbers do. torch-fidelity's constructor only takes weights through
    `torch.load(path)`: it gets a file of this worker's own making, from the store's
    safetensors, and the load is forced to weights only.
    """
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        state = load_file(str(folder / "model.safetensors"))
        with tempfile.TemporaryDirectory() as tmp, _weights_only_loads():
            path = os.path.join(tmp, "inception.pt")
            torch.save(state, path)
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=path, antialias=False)
    except ModuleNotFoundError as err:
        raise RuntimeError("the standard FID Inception needs torch-fidelity: pip install 'blipinpaint[fid]'") from err
