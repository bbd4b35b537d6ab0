"""Robust image decoding: bytes in, a fixed-size RGB uint8 array or a clear reason out.

One bad file never ends a batch: every failure becomes that row's `error` string, of the
form `<kind>: <detail>`, where `<kind>` is one of `ERROR_KINDS` (stats group by it).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

ERROR_KINDS = (
    "read failed", "empty file", "not an image", "decompression bomb", "corrupt image", "too small",
    "aspect ratio",
)


class ImageError(ValueError):
    """An input that cannot be used; `str(err)` is the reason written to the errors table."""

    def __init__(self, kind: str, detail: str):
        assert kind in ERROR_KINDS, kind
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def open_image(data: bytes) -> Image.Image:
    """Decode fully to RGB with EXIF orientation applied; raise `ImageError` otherwise.

    Pillow's pixel limit (`Image.MAX_IMAGE_PIXELS`) is kept: above it Pillow only warns
    (up to twice the limit), so the warning is raised as an error too.
    """
    if not data:
        raise ImageError("empty file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # decode now: truncation and bad CRCs surface here, not later
            img = ImageOps.exif_transpose(img)
    except Image.UnidentifiedImageError:
        raise ImageError("not an image", f"format not recognised ({len(data)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("decompression bomb", str(err)) from None
    except Exception as err:  # noqa: BLE001 - decoders raise many types on hostile input
        raise ImageError("corrupt image", f"{type(err).__name__}: {err}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and 16-bit to RGB; transparency composited on white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit samples span 0..65535; Pillow's convert("L") would clip them at 255.
        arr = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def fit_square(img: Image.Image, size: int, min_side: int, max_aspect_ratio: float) -> np.ndarray:
    """Resize the shorter side to `size` and center-crop to `size`x`size` (uint8 HWC)."""
    w, h = img.size
    if min(w, h) < min_side:
        raise ImageError("too small", f"{w}x{h} pixels, need at least {min_side} on the shorter side")
    if max(w, h) / min(w, h) > max_aspect_ratio:
        raise ImageError(
            "aspect ratio", f"{w}x{h} is {max(w, h) / min(w, h):.1f}:1, at most {max_aspect_ratio}:1 is used"
        )
    fitted = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
    return np.asarray(fitted, dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 HWC (or HW) array."""
    buf = io.BytesIO()
    # Level 1: most of PNG's size gain at a fraction of the default level's CPU time.
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


class ImageDecoder:
    """Stage: `bytes` -> `image` (B, size, size, 3) uint8, plus `error` and the original size.

    Rows that fail keep a zero image and a non-empty `error`; a row arriving with an
    `error` already set (e.g. the file could not be read) passes through untouched.
    """

    def __init__(self, size: int, min_side: int = 32, max_aspect_ratio: float = 4.0):
        if size % 8:
            raise ValueError(f"image size must be a multiple of 8 (the VAE's stride), got {size}")
        self.size = size
        self.min_side = min_side
        self.max_aspect_ratio = max_aspect_ratio

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        images = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        errors = np.array(batch["error"] if "error" in batch else [""] * n, dtype=object)
        widths = np.zeros(n, dtype=np.int32)
        heights = np.zeros(n, dtype=np.int32)
        for i, data in enumerate(batch["bytes"]):
            if errors[i]:
                continue
            try:
                img = open_image(data)
                widths[i], heights[i] = img.size
                images[i] = fit_square(img, self.size, self.min_side, self.max_aspect_ratio)
            except ImageError as err:
                errors[i] = str(err)
        out = {k: v for k, v in batch.items() if k != "bytes"}  # the raw bytes are not needed past here
        out.update(image=images, error=errors, width=widths, height=heights)
        return out
