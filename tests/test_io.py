import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import encode, photo, png_with_size, with_exif_orientation
from PIL import Image, ImageOps

from blipinpaint.io import ImageDecoder, decode, decode_png, encode_png, fit_square, open_image, to_rgb

# EXIF orientation -> how the stored pixels must be turned to display upright (numpy ops,
# independent of Pillow's own table).
ORIENTATIONS = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def kind(data: bytes) -> str:
    with pytest.raises(ValueError) as err:
        open_image(data)
    return str(err.value).split(":")[0]


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(orientation):
    stored = photo(96, 64)
    reference = np.asarray(open_image(encode(stored, "JPEG", quality=95)), dtype=np.float32)
    decoded = np.asarray(open_image(with_exif_orientation(stored, orientation)), dtype=np.float32)
    expected = ORIENTATIONS[orientation](reference)
    assert decoded.shape == expected.shape
    assert np.abs(decoded - expected).mean() < 2  # same JPEG pixels, turned


def test_grayscale_palette_and_cmyk_become_rgb():
    gray = Image.new("L", (40, 40), 77)
    assert np.all(np.asarray(open_image(encode(gray, "PNG"))) == 77)
    palette = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    rgb = open_image(encode(palette, "PNG"))
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), np.asarray(palette.convert("RGB")))
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # pure red in CMYK
    red = np.asarray(open_image(encode(cmyk, "JPEG", quality=95))).reshape(-1, 3).mean(axis=0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 20, 40))  # left half fully transparent
    out = np.asarray(open_image(encode(rgba, "PNG")))
    assert np.all(out[:, :20] == 255) and np.all(out[:, 20:] == [255, 0, 0])
    la = Image.new("LA", (40, 40), (0, 128))  # black at half alpha over white -> mid gray
    assert abs(int(np.asarray(open_image(encode(la, "PNG")))[0, 0, 0]) - 127) <= 1
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert np.all(np.asarray(open_image(encode(palette, "PNG", transparency=0))) == 255)


def test_sixteen_bit_png_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16).repeat(40, axis=0).repeat(20, axis=1)
    out = np.asarray(open_image(encode(Image.fromarray(arr), "PNG")))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 20].tolist() == [128, 128, 128]
    assert out[0, 59].tolist() == [255, 255, 255]


def test_sixteen_bit_samples_become_the_nearest_eight_bit_value():
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = np.asarray(open_image(encode(Image.fromarray(every), "PNG")))[..., 0]
    assert np.array_equal(out, np.rint(every / 257.0).astype(np.uint8))
    wide = Image.fromarray(np.array([[-5, 0, 128, 129, 65535, 70000]], dtype=np.int32))  # mode I: 32-bit
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 0, 0, 1, 255, 255]


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(open_image(data))
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 50


def test_bad_inputs_get_a_reason_not_an_exception():
    jpeg = encode(photo(), "JPEG")
    png = encode(photo(), "PNG")
    assert kind(b"") == "empty file"
    assert kind(b"just some text\n" * 10) == "not an image"
    assert kind(jpeg[: len(jpeg) // 2]) == "corrupt image"
    assert kind(png[: len(png) // 2]) == "corrupt image"
    idat = png.index(b"IDAT")
    broken_crc = png[: idat + 10] + bytes([png[idat + 10] ^ 0xFF]) + png[idat + 11:]
    assert kind(broken_crc) == "corrupt image"
    assert kind(png_with_size(20_000, 20_000)) == "decompression bomb"
    # Between Pillow's limit and twice it, Pillow only warns: still refused.
    limit = Image.MAX_IMAGE_PIXELS
    assert kind(png_with_size(int(limit**0.5) + 100, int(limit**0.5) + 100)) == "decompression bomb"


def test_fit_square_crops_the_center_and_checks_size():
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # red middle third
    out = fit_square(img, 64, min_side=32, max_aspect_ratio=4)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.all(out[:, 4:60, 0] > 240)  # only the red center survives the crop
    with pytest.raises(ValueError, match="too small: 1x1"):
        fit_square(Image.new("RGB", (1, 1)), 64, min_side=32, max_aspect_ratio=4)
    with pytest.raises(ValueError, match="aspect ratio: 1000x50"):
        fit_square(Image.new("RGB", (1000, 50)), 64, min_side=32, max_aspect_ratio=4)


def test_decoder_batch_keeps_every_row():
    batch = {
        "id": np.array(["good", "text", "unread", "tiny"], dtype=object),
        "source": np.array(["a", "b", "c", "d"], dtype=object),
        "bytes": np.array([encode(photo(), "PNG"), b"hello", b"", encode(Image.new("RGB", (2, 2)), "PNG")],
                          dtype=object),
        "error": np.array(["", "", "read failed: no such file", ""], dtype=object),
    }
    out = ImageDecoder(64)(batch)
    assert "bytes" not in out
    assert out["image"].shape == (4, 64, 64, 3) and out["image"].dtype == np.uint8
    assert out["error"][0] == "" and out["image"][0].std() > 0
    assert out["error"][1].startswith("not an image")
    assert out["error"][2] == "read failed: no such file"
    assert out["error"][3].startswith("too small")
    assert (out["width"][0], out["height"][0]) == (96, 80)


def test_decoder_rejects_sizes_the_vae_cannot_take():
    with pytest.raises(ValueError, match="multiple of 8"):
        ImageDecoder(100)


def test_png_round_trip_is_lossless():
    arr = np.asarray(photo())
    assert np.array_equal(decode_png(encode_png(arr)), arr)


def test_min_side_and_max_aspect_ratio_come_from_the_config(tmp_path):
    """`data.min_side` and `data.max_aspect_ratio` decide which inputs become error rows."""
    from blipinpaint import builders
    from blipinpaint.config import load_config
    from blipinpaint.source_reads import read_files
    from blipinpaint.sources import items_to_batch, list_folder

    (tmp_path / "small.png").write_bytes(encode(photo(40, 40), "PNG"))
    (tmp_path / "wide.png").write_bytes(encode(photo(120, 40), "PNG"))  # 3:1

    def errors(*overrides):
        cfg = load_config(overrides=list(overrides))
        batch = builders.build_decoder(cfg)(read_files(items_to_batch(list_folder(str(tmp_path)))))
        return {i: e.split(":")[0] for i, e in zip(batch["id"], batch["error"]) if e}

    assert errors() == {}  # the defaults (32, 4.0) take both
    assert set(errors("data.min_side=48")) == {"small.png", "wide.png"}
    assert set(errors("data.max_aspect_ratio=2.5")) == {"wide.png"}


# Limits on what one input may cost to decode: a small file must not expand to gigabytes,
# and a large JPEG is decoded near the working size, not at full size.

SAMPLES = Path(__file__).resolve().parents[1] / "blipinpaint" / "samples"

PEAK = """
import json, sys
import numpy as np
from blipinpaint.io import ImageDecoder
def peak_mb():  # this process image's own peak (ru_maxrss would start at pytest's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
data = open(sys.argv[1], "rb").read()
batch = {"id": np.array(["x"], dtype=object), "bytes": np.array([data], dtype=object)}
decoder = ImageDecoder(int(sys.argv[2]))
before = peak_mb()
out = decoder(batch)
print(json.dumps({"growth_mb": peak_mb() - before, "error": out["error"][0]}))
"""


def decode_in_a_fresh_process(path, size: int) -> tuple[float, str]:
    """(growth of the peak resident memory in MB, error) of decoding one file, in a new process."""
    out = subprocess.run([sys.executable, "-c", PEAK, str(path), str(size)], capture_output=True, text=True,
                         check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["growth_mb"], result["error"]


def png_bomb(width: int, height: int) -> bytes:
    """A valid, fully decodable PNG of `width`x`height` transparent RGBA pixels, built in a
    fraction of a second: every row is the same raw deflate block (no reference outside it)."""
    row = b"\x00" + bytes(4 * width)  # filter byte, then the row's pixels
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(row) + deflate.flush(zlib.Z_SYNC_FLUSH)
    adler = 1
    for _ in range(height):
        adler = zlib.adler32(row, adler)
    idat = b"\x78\xda" + block * height + b"\x03\x00" + struct.pack(">I", adler)  # + an empty final block

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def collage(width: int, height: int) -> Image.Image:
    """The shipped photographs tiled at their own resolution: real detail at every scale, and
    no symmetry, so a wrong turn shows."""
    tiles = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.jpg"))]
    canvas = Image.new("RGB", (width, height))
    x = y = k = 0
    while y < height:
        canvas.paste(tiles[k % len(tiles)], (x, y))
        x, k = x + tiles[k % len(tiles)].width, k + 1
        if x >= width:
            x, y = 0, y + max(t.height for t in tiles)
    return canvas


def test_a_small_file_that_decodes_to_gigabytes_is_refused_from_its_header(tmp_path):
    """0.5 MB of PNG, 9400x9400 RGBA: under Pillow's decompression-bomb limit (89 MP), it
    took 1.7 GB and 3 s to decode. Its header says what it would cost: refused before."""
    bomb = png_bomb(9400, 9400)
    assert len(bomb) < 2**20 and Image.open(io.BytesIO(bomb)).size == (9400, 9400)
    (tmp_path / "bomb.png").write_bytes(bomb)
    growth, error = decode_in_a_fresh_process(tmp_path / "bomb.png", 64)
    assert error.startswith("too large: 9400x9400 pixels decode to 337 MB"), error
    assert growth < 50, f"{growth:.0f} MB to refuse it"
    # The same from the header alone (no pixel data): the kind is `too large`, for any format.
    assert kind(png_with_size(9400, 9400)) == "too large"
    assert kind(encode(Image.new("RGB", (6000, 6000)), "GIF")) == "too large"
    assert kind(png_with_size(5000, 5000)) == "corrupt image"  # 25 MP may be decoded (and is cut short here)


@pytest.mark.parametrize("size", [64, 512])
def test_a_large_jpeg_is_decoded_near_the_working_size(size, tmp_path):
    """A 27 MP JPEG took 209 MB to decode at full size; libjpeg's draft mode decodes it at 1/8
    or 1/4 scale instead, and the result matches the full decode's within resizing noise."""
    big = collage(6000, 4500)
    data = encode(big, "JPEG", quality=90)
    (tmp_path / "big.jpg").write_bytes(data)
    growth, error = decode_in_a_fresh_process(tmp_path / "big.jpg", size)
    assert error == "" and growth < 40, f"{growth:.0f} MB"
    out = ImageDecoder(size)({"id": np.array(["x"], dtype=object), "bytes": np.array([data], dtype=object)})
    assert (out["width"][0], out["height"][0]) == (6000, 4500)  # the input's size, not the draft's
    full = fit_square(open_image(data), size, min_side=32, max_aspect_ratio=4).astype(np.float32)
    diff = np.abs(out["image"][0].astype(np.float32) - full)
    # Resizing noise of libjpeg's scaled decoding (measured: mean 0.09-0.36, p99 1-3), with room
    # for another libjpeg build.
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 6, (diff.mean(), np.percentile(diff, 99))


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied_to_a_draft_decoded_jpeg(orientation):
    """A JPEG large enough to be decoded at half scale is still turned upright, its centre crop
    is the same region (2401x1601: the draft's last row and column cover half a pixel each),
    and its reported size is its upright full size."""
    stored = collage(2401, 1601)
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    assert decode(tagged, ImageDecoder(64).draft_side).scale == 2  # decoded at half scale, not whole
    out = ImageDecoder(64)({"id": np.array(["x"], dtype=object), "bytes": np.array([tagged], dtype=object)})
    upright = (1601, 2401) if orientation >= 5 else (2401, 1601)
    assert out["error"][0] == "" and (out["width"][0], out["height"][0]) == upright
    decoded = out["image"][0].astype(np.float32)
    full = fit_square(open_image(tagged), 64, min_side=32, max_aspect_ratio=4)  # full decode, turned, resized
    assert np.abs(decoded - full).mean() < 0.2
    plain = fit_square(open_image(encode(stored, "JPEG", quality=95)), 64, min_side=32, max_aspect_ratio=4)
    assert np.abs(decoded - ORIENTATIONS[orientation](plain.astype(np.float32))).mean() < 1


@pytest.mark.parametrize("size", [64, 512])
def test_shipped_samples_decode_exactly_as_a_full_decode_and_resize(size):
    """The default run's inputs are small: no draft, no other path; the arrays are the full
    decode's, resized by Pillow's own centre-crop fit, byte for byte."""
    for path in sorted(p for p in SAMPLES.iterdir() if p.suffix in (".jpg", ".png")):
        data = path.read_bytes()
        out = ImageDecoder(size)({"id": np.array([path.name], dtype=object), "bytes": np.array([data], dtype=object)})
        full = open_image(data)
        assert out["error"][0] == "" and (out["width"][0], out["height"][0]) == full.size
        assert np.array_equal(out["image"][0], np.asarray(ImageOps.fit(full, (size, size), Image.Resampling.BICUBIC)))


def test_the_pixel_limit_is_the_configs(tmp_path):
    """`data.max_image_mp` sets the limit the decoder applies from the header."""
    from blipinpaint import builders
    from blipinpaint.config import load_config

    data = encode_png(np.zeros((120, 100, 3), np.uint8))  # 0.012 megapixels
    batch = {"id": np.array(["x"], dtype=object), "bytes": np.array([data], dtype=object)}
    strict = builders.build_decoder(load_config(overrides=[f"run_dir={tmp_path}", "data.max_image_mp=0.01"]))
    assert str(strict(dict(batch))["error"][0]).startswith("too large: 100x120 pixels decode to")
    assert "(data.max_image_mp)" in strict(dict(batch))["error"][0]
    assert builders.build_decoder(load_config(overrides=[f"run_dir={tmp_path}"]))(dict(batch))["error"][0] == ""
