"""Robust image decoding: bytes in, a fixed-size RGB uint8 array or a clear reason out.

One bad file never ends a batch: every failure becomes that row's `error` string, of the
form `<kind>: <detail>`, where `<kind>` is one of `ERROR_KINDS` (stats group by it).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageMode, ImageOps

ERROR_KINDS = (
    "read failed", "empty file", "not an image", "decompression bomb", "too large", "corrupt image", "too small",
    "aspect ratio",
)

# The most pixels an input may decode to, by default (`data.max_image_mp` sets it). A PNG of
# 0.5 MB can hold 9400x9400 RGBA pixels, under Pillow's decompression-bomb limit (89 MP), and
# decoding one took 1.7 GB and 3 s: about 20 bytes a pixel at the peak. 33.5 MP bounds that
# near 650 MB and still takes 8K UHD frames (7680x4320). Large JPEGs are decoded at reduced
# scale (`DRAFT_MIN_SIDE`), so their decoded size is what counts.
MAX_DECODED_PIXELS = 33_500_000
# A JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale when its shorter side stays at least
# max(2 x the working size, DRAFT_MIN_SIDE): twice the working size keeps the final resize a
# downscale (its result matches the full decode's within resizing noise), and below 1024 pixels a
# full decode costs a few MB, so small photographs (the shipped samples) decode exactly as before.
DRAFT_MIN_SIDE = 512
# EXIF orientation -> the turn that makes the stored pixels upright (as ImageOps.exif_transpose).
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


class ImageError(ValueError):
    """An input that cannot be used; `str(err)` is the reason written to the errors table."""

    def __init__(self, kind: str, detail: str):
        assert kind in ERROR_KINDS, kind
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass
class Decoded:
    """An input decoded to RGB as stored (not yet turned upright), with what it takes to finish:
    `size` is the input's own size as stored, `scale` how much smaller it was decoded (1, 2, 4
    or 8; a JPEG draft), `orientation` its EXIF orientation."""

    image: Image.Image
    size: tuple[int, int]
    scale: float
    orientation: int

    @property
    def upright_size(self) -> tuple[int, int]:
        return self.size[::-1] if self.orientation >= 5 else self.size


def decode(data: bytes, at_least: int | None = None, max_pixels: int = MAX_DECODED_PIXELS) -> Decoded:
    """Decode to RGB, not yet turned upright; raise `ImageError` otherwise.

    Pillow's pixel limit (`Image.MAX_IMAGE_PIXELS`) is kept: above it Pillow only warns
    (up to twice the limit), so the warning is raised as an error too. Then the header's size
    is checked against `max_pixels` before any pixel is decoded. With `at_least`, a
    JPEG whose shorter side is at least twice it is decoded at reduced scale, its shorter side
    still at least `at_least`.
    """
    if not data:
        raise ImageError("empty file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            size, scale = img.size, 1.0
            if at_least and img.format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with extra frames
                drafted = img.draft(None, (at_least, at_least))
                if drafted is not None:
                    scale = size[0] / drafted[1][2]  # the box of the input in the draft's pixels
            _check_decoded_size(img, max_pixels)
            img.load()  # decode now: truncation and bad CRCs surface here, not later
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image", f"format not recognised ({len(data)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("decompression bomb", str(err)) from None
    except Exception as err:  # noqa: BLE001 - decoders raise many types on hostile input
        raise ImageError("corrupt image", f"{type(err).__name__}: {err}") from None
    return Decoded(to_rgb(img), size, scale, orientation if orientation in UPRIGHT else 1)


def _check_decoded_size(img: Image.Image, max_pixels: int) -> None:
    """Refuse, from the header, an image of more than `max_pixels` pixels."""
    w, h = img.size
    if w * h > max_pixels:
        mode = ImageMode.getmode(img.mode)
        mb = w * h * len(mode.bands) * np.dtype(mode.typestr).itemsize / 2**20
        raise ImageError("too large", f"{w}x{h} pixels decode to {mb:.0f} MB ({img.mode}), more than the "
                                      f"{max_pixels / 1e6:.1f} megapixels an input may have (data.max_image_mp)")


def open_image(data: bytes) -> Image.Image:
    """The whole image: RGB, full size, with EXIF orientation applied (see `decode`)."""
    decoded = decode(data)
    method = UPRIGHT.get(decoded.orientation)
    return decoded.image.transpose(method) if method is not None else decoded.image


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and 16-bit to RGB; transparency composited on white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit samples span 0..65535; Pillow's convert("L") would clip them at 255. The nearest
        # 8-bit value, round(x / 257), in integers (x / 257 is never a tie): 4 bytes a pixel, not
        # the 8 of each float64 temporary.
        arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        arr *= 2
        arr += 257
        arr //= 514
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def check_shape(w: int, h: int, min_side: int, max_aspect_ratio: float) -> None:
    if min(w, h) < min_side:
        raise ImageError("too small", f"{w}x{h} pixels, need at least {min_side} on the shorter side")
    if max(w, h) / min(w, h) > max_aspect_ratio:
        raise ImageError(
            "aspect ratio", f"{w}x{h} is {max(w, h) / min(w, h):.1f}:1, at most {max_aspect_ratio}:1 is used"
        )


def fit_square(img: Image.Image, size: int, min_side: int, max_aspect_ratio: float) -> np.ndarray:
    """Resize the shorter side to `size` and center-crop to `size`x`size` (uint8 HWC)."""
    check_shape(*img.size, min_side, max_aspect_ratio)
    fitted = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
    return np.asarray(fitted, dtype=np.uint8)


def fit_decoded(decoded: Decoded, size: int) -> np.ndarray:
    """`fit_square`'s crop and resize of the upright input, from a `Decoded` (its shape checked).

    Decoded at full size, this is exactly turning it upright and then `ImageOps.fit`. Drafted,
    the centre square is cropped and resized as stored, in the input's own coordinates divided
    by the scale (a draft's last row and column may cover less than `scale` input pixels, which
    would shift a crop computed on the turned draft), and only the small result is turned.
    """
    method = UPRIGHT.get(decoded.orientation)
    if decoded.scale == 1:
        upright = decoded.image.transpose(method) if method is not None else decoded.image
        return np.asarray(ImageOps.fit(upright, (size, size), method=Image.Resampling.BICUBIC), dtype=np.uint8)
    w, h = decoded.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    box = tuple(v / decoded.scale for v in (left, top, left + side, top + side))
    fitted = decoded.image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(fitted.transpose(method) if method is not None else fitted, dtype=np.uint8)


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

    def __init__(self, size: int, min_side: int = 32, max_aspect_ratio: float = 4.0,
                 max_pixels: int = MAX_DECODED_PIXELS):
        if size % 8:
            raise ValueError(f"image size must be a multiple of 8 (the VAE's stride), got {size}")
        self.size, self.max_pixels = size, max_pixels
        self.draft_side = max(2 * size, DRAFT_MIN_SIDE)
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
                decoded = decode(data, self.draft_side, self.max_pixels)
                widths[i], heights[i] = decoded.upright_size
                check_shape(*decoded.upright_size, self.min_side, self.max_aspect_ratio)
                images[i] = fit_decoded(decoded, self.size)
            except ImageError as err:
                errors[i] = str(err)
        out = {k: v for k, v in batch.items() if k != "bytes"}  # the raw bytes are not needed past here
        out.update(image=images, error=errors, width=widths, height=heights)
        return out
