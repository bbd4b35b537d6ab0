"""Load each role's model from a `ModelRef`: a local folder, or a folder URI (the model store);
and write the fine-tuned captioner as a folder that loads the same way.

Every load goes through `from_pretrained` with `use_safetensors=True` (a pickle checkpoint
is refused) and never with `trust_remote_code`. Hub checkpoints are never loaded from the
hub here: the model store (`blipinpaint.models.store`) fetched, verified and converted them
once, and workers load the store's folders. Models load on the CPU in fp32 unless the
caller asks otherwise; device and dtype are always explicit.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blipinpaint.models import fid_inception, store
from blipinpaint.models.inception import InceptionFeatures
from blipinpaint.models.presets import FID_INCEPTION_SHA256, ModelRef
from blipinpaint.storage import filesystem, is_remote, local_dir, upload_dir

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


def write_blip(original: CaptionerModel, decoder_state: dict[str, torch.Tensor], blip_dir: str) -> torch.nn.Module:
    """The `original` captioner (fp32, on the CPU) with `decoder_state` as its text decoder,
    saved to `blip_dir`: that decoder."""
    parameters = dict(original.model.text_decoder.named_parameters())
    with torch.no_grad():
        for name, value in decoder_state.items():
            parameters[name].copy_(value)
    with tempfile.TemporaryDirectory() as folder:  # from_pretrained-able, then to run_dir (maybe a bucket)
        for part in (original.model, original.tokenizer, original.image_processor):
            part.save_pretrained(folder)
        upload_dir(folder, blip_dir)
    return original.model.text_decoder


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
    """An uint8-image -> feature network with `num_features`, as torchmetrics' FID expects:
    the FID Inception v3 for a folder that holds one (the model store's entries), else the
    offline Inception-style network."""
    folder = Path(model_folder(ref))
    if _fid_config(folder).get("feature_extractor") == fid_inception.FEATURE_EXTRACTOR:
        return fid_inception.FidInceptionV3.from_pretrained(folder).to(device)
    return InceptionFeatures.from_pretrained(folder).to(device)


def _fid_config(folder: Path) -> dict:
    if not (folder / "config.json").is_file():
        raise ValueError(f"FID network {folder}: no config.json, not a model folder (for torch-fidelity's weights "
                         "file, give the file itself as models.fid.name_or_path)")
    return json.loads((folder / "config.json").read_text())


def describe_fid_features(ref: ModelRef, pinned_sha256: str = FID_INCEPTION_SHA256) -> dict:
    """Which FID network `ref`'s folder holds, told from what `load_fid_features` loads from it:
    its architecture, its weights' sha256, and whether they are the standard FID weights.

    Standard means: the FID Inception v3, whose `model.safetensors` is the file the model
    store wrote (its record's sha256) from a weights file whose sha256 it checked against
    `pinned_sha256`. A folder's name or config.json alone never makes a network standard.
    """
    folder = Path(model_folder(ref))
    config = _fid_config(folder)
    weights = store.sha256(folder / fid_inception.WEIGHTS_NAME)
    if config.get("feature_extractor") != fid_inception.FEATURE_EXTRACTOR:
        return {"network": "inception-style (offline)", "num_features": config.get("num_features"),
                "weights_sha256": weights, "standard": False,
                "evidence": "not the Inception v3 architecture of FID"}
    record = store.manifest(ref.name_or_path) if store.is_complete(ref.name_or_path) else None
    converted = (record or {}).get("files", {}).get(fid_inception.WEIGHTS_NAME, {})
    standard = False
    if record is None:
        evidence = "no model store record (_store.json) says where these weights came from"
    elif converted.get("sha256") != weights:
        evidence = f"{fid_inception.WEIGHTS_NAME} is not the file the model store wrote ({converted.get('sha256')})"
    elif record["source"].get("sha256") != pinned_sha256:
        evidence = (f"the model store converted them from a file of sha256 {record['source'].get('sha256')}, "
                    f"not the pinned standard {pinned_sha256}")
    else:
        standard = True
        evidence = f"the model store converted them from a file whose sha256 it checked: the pinned {pinned_sha256}"
    return {"network": fid_inception.FEATURE_EXTRACTOR, "num_features": fid_inception.NUM_FEATURES,
            "weights_sha256": weights, "standard": standard, "evidence": evidence}
