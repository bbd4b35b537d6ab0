"""Load each role's model from a `ModelRef`: a local folder or a pinned hub id.

Every load goes through `from_pretrained` with `use_safetensors=True` (a pickle checkpoint
is refused) and never with `trust_remote_code`. Models load on the CPU in fp32 unless the
caller asks otherwise; device and dtype are always explicit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPModel,
)

from blipinpaint.models.inception import InceptionFeatures
from blipinpaint.models.presets import FID_INCEPTION_V3, ModelRef

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
    """Map a config dtype string to torch; half precision is for CUDA only."""
    if name not in DTYPES:
        raise ValueError(f"models.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("models.dtype=fp16 needs a CUDA device; use fp32 on CPU")
    return DTYPES[name]


def _source(ref: ModelRef) -> dict:
    """`from_pretrained` arguments for a ref; hub ids must carry a pinned revision."""
    if Path(ref.name_or_path).is_dir():
        return {"pretrained_model_name_or_path": ref.name_or_path}
    if not ref.revision:
        raise ValueError(
            f"model {ref.name_or_path!r} is neither a local folder nor pinned: give its revision (a commit hash)"
        )
    return {"pretrained_model_name_or_path": ref.name_or_path, "revision": ref.revision}


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


def load_captioner(ref: ModelRef, device: torch.device, dtype: torch.dtype = torch.float32) -> CaptionerModel:
    src = _source(ref)
    model = BlipForConditionalGeneration.from_pretrained(**src, dtype=dtype, use_safetensors=True)
    return CaptionerModel(
        model=model.to(device).eval(),
        # The PIL processor: the default one needs torchvision, which is not a dependency.
        image_processor=BlipImageProcessorPil.from_pretrained(**src),
        tokenizer=AutoTokenizer.from_pretrained(**src),
    )


def load_clip(ref: ModelRef, device: torch.device, dtype: torch.dtype = torch.float32) -> ClipModel:
    src = _source(ref)
    model = CLIPModel.from_pretrained(**src, dtype=dtype, use_safetensors=True)
    return ClipModel(
        model=model.to(device).eval(),
        image_processor=CLIPImageProcessorPil.from_pretrained(**src),
        tokenizer=AutoTokenizer.from_pretrained(**src),
    )


def load_inpaint_pipeline(ref: ModelRef, device: torch.device, dtype: torch.dtype = torch.float32):
    from diffusers import StableDiffusionInpaintPipeline  # heavy import, only where inpainting runs

    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        **_source(ref), dtype=dtype, use_safetensors=True,
        # Scoring-data generation needs raw outputs; the checker would blank images at random.
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)  # one bar per batch would flood the job log
    return pipe.to(device)


def load_fid_features(ref: ModelRef, device: torch.device) -> torch.nn.Module:
    """An uint8-image -> feature network with `num_features`, as torchmetrics' FID expects."""
    if ref.name_or_path == FID_INCEPTION_V3:
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except ImportError as err:
            raise RuntimeError(
                "the standard FID Inception needs torch-fidelity: pip install 'blipinpaint[fid]'"
            ) from err
        return net.to(device).eval()
    if not Path(ref.name_or_path).is_dir():
        raise ValueError(f"FID feature network {ref.name_or_path!r} is not a local folder")
    return InceptionFeatures.from_pretrained(ref.name_or_path).to(device)
