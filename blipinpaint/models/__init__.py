"""Model presets, offline builders and loaders (one `load_*` per role)."""

from blipinpaint.models.loading import (
    CaptionerModel,
    ClipModel,
    load_captioner,
    load_clip,
    load_fid_features,
    load_inpaint_pipeline,
    torch_device,
    torch_dtype,
)
from blipinpaint.models.presets import (
    PRESET_NAMES,
    ModelRef,
    Preset,
    get_preset,
    native_image_size,
    with_overrides,
)

__all__ = [
    "CaptionerModel", "ClipModel", "ModelRef", "PRESET_NAMES", "Preset", "get_preset", "load_captioner",
    "load_clip", "load_fid_features", "load_inpaint_pipeline", "native_image_size", "torch_device",
    "torch_dtype", "with_overrides",
]
