"""Model presets, offline builders and loaders (one `load_*` per role).

The loaders are imported on first use: `blipinpaint.config` imports the presets from this
package, and every process that reads a config should not pay transformers' import.
"""

import logging

from blipinpaint.models.presets import (
    PRESET_NAMES,
    ModelRef,
    Preset,
    get_preset,
    native_image_size,
    with_overrides,
)

_LOADING = ("CaptionerModel", "ClipModel", "describe_fid_features", "load_captioner", "load_clip",
            "load_fid_features", "load_inpaint_pipeline", "torch_device", "torch_dtype")

__all__ = ["ModelRef", "PRESET_NAMES", "Preset", "get_preset", "native_image_size", "with_overrides", *_LOADING]


def __getattr__(name: str):
    if name in _LOADING:
        from blipinpaint.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _NoTorchvisionNotice(logging.Filter):
    """torchvision is left out on purpose (the loaders use the PIL image processors), so
    transformers' notice that a PIL processor stands in for a torchvision one, given in every
    worker that imports diffusers, says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
