import numpy as np
import pytest
from helpers import encode, photo, png_with_size, with_exif_orientation
from PIL import Image

from blipinpaint.io import ImageDecoder, decode_png, encode_png, fit_square, open_image

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
