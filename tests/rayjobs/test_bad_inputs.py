"""The bad-input matrix through the whole generate job: each awkward or hostile input ends
as a sample (where it is usable) or an error row with a clear reason, the job never
crashes, and every input is accounted for. Each case prints an `INPUT` line, which
RELIABILITY.md reports."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import account, encode, photo, png_with_size, print_figures, with_exif_orientation
from PIL import Image

from blipinpaint.config import load_config
from blipinpaint.io import decode_png
from rayjobs import generate

NON_UTF8 = b"caf\xe9.png"  # a Latin-1 name, as old archives have them
NON_UTF8_ID = "caf\\xe9.png"  # its id: the bytes that are not UTF-8 spelled out


def _files() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, expected outcome: "sample" or the error's kind)."""
    jpeg, png = encode(photo(), "JPEG"), encode(photo(), "PNG")
    idat = png.index(b"IDAT")
    palette = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    frames = [photo(seed=s) for s in (1, 2, 3)]
    files = {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt image"),
        "truncated.png": (png[: len(png) // 2], "corrupt image"),
        "bad-crc.png": (png[: idat + 10] + bytes([png[idat + 10] ^ 0xFF]) + png[idat + 11:], "corrupt image"),
        "zero-bytes.jpg": (b"", "empty file"),
        "text.jpg": (b"this is a text file, not a picture\n" * 20, "not an image"),
        "bomb.png": (png_with_size(30_000, 30_000), "decompression bomb"),
        "cmyk.jpg": (encode(photo().convert("CMYK"), "JPEG"), "sample"),
        "sixteen-bit.png": (encode(Image.fromarray(np.asarray(photo().convert("L"), np.uint16) * 257), "PNG"),
                            "sample"),
        "grayscale.png": (encode(photo().convert("L"), "PNG"), "sample"),
        "palette-transparent.png": (encode(palette, "PNG", transparency=0), "sample"),
        "rgba.png": (encode(photo().convert("RGBA"), "PNG"), "sample"),
        "animated.gif": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), "sample"),
        "one-pixel.png": (encode(photo(1, 1), "PNG"), "too small"),
        "panorama.jpg": (encode(photo(640, 64), "JPEG"), "aspect ratio"),
        # 48x48: smaller than the paper's 200x200 box; resized to the working size like any image.
        "smaller-than-mask.png": (encode(photo(48, 48), "PNG"), "sample"),
    }
    for orientation in range(1, 9):
        files[f"exif-{orientation}.jpg"] = (with_exif_orientation(photo(96, 64), orientation), "sample")
    return files


def _run(run_dir, source, *extra):
    cfg = load_config(overrides=[f"run_dir={run_dir}", f"data.source={source}", "generate.read.batch_size=4",
                                 "generate.rows_per_file=8", *extra])
    return generate.run(cfg)


def _outcomes(run_dir) -> dict[str, str]:
    """id -> "sample" or the error text, from the Parquet files."""
    out = run_dir / "generate"
    samples = pq.read_table(out / "samples", columns=["id"]).column("id").to_pylist()
    errors = pq.read_table(out / "errors", columns=["id", "error"])
    return {**{i: "sample" for i in samples},
            **dict(zip(errors.column("id").to_pylist(), errors.column("error").to_pylist()))}


@pytest.fixture(scope="module")
def folder_run(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    files = _files()
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    os.makedirs(os.fsencode(root), exist_ok=True)
    with open(os.path.join(os.fsencode(root), NON_UTF8), "wb") as f:
        f.write(encode(photo(80, 72, seed=5), "PNG"))
    # A file over data.max_file_mb is refused before it is read into memory (sparse: no disk used).
    with open(root / "huge.jpg", "wb") as f:
        f.truncate(3 * 2**20)
    run_dir = tmp_path_factory.mktemp("bad-inputs-run")
    stats = _run(run_dir, root, "data.max_file_mb=2")
    expected = {name: kind for name, (_, kind) in files.items()} | {NON_UTF8_ID: "sample", "huge.jpg": "too large"}
    return run_dir, stats, expected


def test_every_bad_input_gets_its_outcome(folder_run):
    run_dir, stats, expected = folder_run
    outcomes = _outcomes(run_dir)
    for name in sorted(expected):
        print(f"\nINPUT {name}: {outcomes.get(name, 'MISSING')}")
    assert sorted(outcomes) == sorted(expected)  # every input once, nothing else
    assert {name: o if o == "sample" else o.split(":")[0] for name, o in outcomes.items()} == expected
    figures = account(run_dir / "generate", expected)
    print_figures("bad-input matrix, folder", figures, stats["this_run"]["wall_s"], samples=stats["ok"],
                  errors=stats["errors"])
    assert (figures["lost"], figures["duplicated"], figures["orphans"]) == (0, 0, 0)
    assert stats["missing"] == 0 and (run_dir / "generate" / "_SUCCESS").exists()


def test_error_reasons_say_what_is_wrong(folder_run):
    outcomes = _outcomes(folder_run[0])
    assert "900000000 pixels" in outcomes["bomb.png"]
    assert outcomes["one-pixel.png"] == "too small: 1x1 pixels, need at least 32 on the shorter side"
    assert outcomes["panorama.jpg"].startswith("aspect ratio: 640x64 is 10.0:1")
    assert outcomes["huge.jpg"] == "too large: more than data.max_file_mb=2 MB"
    assert outcomes["zero-bytes.jpg"] == "empty file: 0 bytes"


def test_usable_inputs_are_upright_rgb_samples(folder_run):
    run_dir = folder_run[0]
    table = pq.read_table(run_dir / "generate" / "samples", columns=["id", "width", "height", "image_png", "source"])
    rows = {r["id"]: r for r in table.to_pylist()}
    for orientation in range(1, 9):  # stored 96x64; orientations 5-8 turn it a quarter
        size = (rows[f"exif-{orientation}.jpg"]["width"], rows[f"exif-{orientation}.jpg"]["height"])
        assert size == ((64, 96) if orientation >= 5 else (96, 64)), orientation
    for r in rows.values():
        assert decode_png(r["image_png"]).shape == (64, 64, 3)
    assert rows[NON_UTF8_ID]["source"].endswith(NON_UTF8_ID) and (rows[NON_UTF8_ID]["width"],
                                                                  rows[NON_UTF8_ID]["height"]) == (80, 72)
    sixteen = decode_png(rows["sixteen-bit.png"]["image_png"])
    assert sixteen.max() > 200  # scaled from 0..65535, not clipped to white


def test_manifest_duplicates_missing_files_and_escaping_paths(local_ray, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "good.png").write_bytes(encode(photo(seed=3), "PNG"))
    (tmp_path / "secret.png").write_bytes(encode(photo(seed=4), "PNG"))  # outside the root
    manifest = root / "manifest.parquet"
    pq.write_table(pa.table({
        "id": ["good", "good", "good#2", "gone", "escape", "absolute", "nul"],
        "path": ["good.png", "good.png", "good.png", "missing.png", "../secret.png", str(tmp_path / "secret.png"),
                 "good\x00.png"],
    }), manifest)
    stats = _run(tmp_path / "run", manifest)
    outcomes = _outcomes(tmp_path / "run")
    figures = account(tmp_path / "run" / "generate", outcomes)
    print_figures("bad-input matrix, manifest", figures, stats["this_run"]["wall_s"], samples=stats["ok"],
                  errors=stats["errors"])
    assert (figures["committed"], figures["lost"], figures["duplicated"], figures["orphans"]) == (7, 0, 0, 0)
    for name in sorted(outcomes):
        print(f"\nINPUT manifest {name}: {outcomes[name]}")
    kinds = {i: o.split(":")[0] for i, o in outcomes.items()}
    # The repeated id keeps a row of its own under a suffix that collides with no other id.
    assert kinds == {"good": "sample", "good#3": "duplicate id", "good#2": "sample", "gone": "read failed",
                     "escape": "bad path", "absolute": "bad path", "nul": "bad path"}
    assert outcomes["good#3"] == f"duplicate id: 'good' repeats in {manifest}"
    assert "missing.png" in outcomes["gone"]
    assert (stats["inputs"], stats["missing"], stats["duplicates"]) == (7, 0, 0)
