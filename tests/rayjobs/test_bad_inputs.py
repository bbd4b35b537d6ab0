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
    cfg = load_config(overrides=[f"run_dir={run_dir}", f"data.source={source}", "stream.read.batch_size=4",
                                 "stream.rows_per_file=8", *extra])
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


# The bad-input matrix's cases that a shard or a cell can hold, and those only they can.
SHARDED = ("truncated.jpg", "zero-bytes.jpg", "text.jpg", "bomb.png", "one-pixel.png", "panorama.jpg", "cmyk.jpg",
           "grayscale.png", "rgba.png", "exif-6.jpg")


def _sharded_source(kind: str, root, s3) -> tuple[str, dict[str, str]]:
    """The cases as WebDataset shards in a bucket (one shard cut short, a key with no image)
    or as Parquet image cells on a disk (a null cell); with a member over data.max_file_mb.
    Returns the source and id -> expected outcome."""
    files = {name: _files()[name] for name in SHARDED}
    files["huge.jpg"] = (np.random.default_rng(0).bytes(300_000), "too large")
    if kind == "webdataset":
        from helpers import write_shard

        from blipinpaint.storage import upload_dir

        write_shard(root / "00000.tar", [(name, data) for name, (data, _) in files.items()]
                    + [("caption-only.txt", b"a caption without its image")])
        good = encode(photo(seed=9), "JPEG")
        write_shard(root / "00001.tar", [("whole.jpg", good), ("cut.jpg", good)], cut=3 * 512 + len(good))
        expected = {f"00000.tar/{name.split('.')[0]}": kind for name, (_, kind) in files.items()}
        expected |= {"00000.tar/caption-only": "no image", "00001.tar/whole": "sample",
                     "00001.tar/cut": "read failed", "00001.tar": "corrupt tar"}
        bucket = s3("sharded-bad-inputs")
        upload_dir(root, f"{bucket}/shards")
        return f"{bucket}/shards/{{00000..00001}}.tar", expected
    names = list(files)
    pq.write_table(pa.table({"image": [{"bytes": files[n][0], "path": n} for n in names] + [None],
                             "name": names + ["null-cell"]}), root / "images.parquet", row_group_size=4)
    return str(root / "images.parquet"), {**{n: kind for n, (_, kind) in files.items()}, "null-cell": "bad cell"}


@pytest.mark.parametrize("kind", ["webdataset", "parquet_images"])
def test_shards_and_image_cells_get_the_same_outcomes_exactly_once(kind, local_ray, s3, tmp_path):
    """The bad-input checks of a folder, through the two sharded sources: every input once, as
    a sample or an error row naming shard and key (or file and row); the same command again
    finds nothing to do."""
    root = tmp_path / "source"
    root.mkdir()
    source, expected = _sharded_source(kind, root, s3)
    extra = ["data.id_column=name"] if kind == "parquet_images" else []
    stats = _run(tmp_path / "run", source, "data.max_file_mb=0.25", *extra)
    outcomes = _outcomes(tmp_path / "run")
    for name in sorted(outcomes):
        print(f"\nINPUT {kind} {name}: {outcomes[name]}")
    assert {i: o if o == "sample" else o.split(":")[0] for i, o in outcomes.items()} == expected
    figures = account(tmp_path / "run" / "generate", expected)
    print_figures(f"bad-input matrix, {kind}", figures, stats["this_run"]["wall_s"], samples=stats["ok"],
                  errors=stats["errors"])
    assert (figures["lost"], figures["duplicated"], figures["orphans"]) == (0, 0, 0)
    errors = pq.read_table(tmp_path / "run" / "generate" / "errors").to_pylist()
    where = {r["id"]: r["source"] for r in errors}
    if kind == "webdataset":  # the source names the shard and the member
        assert where["00000.tar/text"] == f"{source.split('{')[0]}00000.tar#text.jpg"
        assert outcomes["00001.tar"].startswith("corrupt tar: s3://sharded-bad-inputs/shards/00001.tar")
    else:
        assert where["null-cell"] == f"{source}#row=11"
        assert outcomes["null-cell"].startswith(f"bad cell: {source} row 11")
    samples = pq.read_table(tmp_path / "run" / "generate" / "samples", columns=["id", "width", "height"]).to_pylist()
    assert {r["id"]: (r["width"], r["height"]) for r in samples}[
        "00000.tar/exif-6" if kind == "webdataset" else "exif-6.jpg"] == (64, 96)  # turned upright
    again = _run(tmp_path / "run", source, "data.max_file_mb=0.25", *extra)
    assert again["this_run"]["processed"] == 0 and again["this_run"]["skipped_committed"] == len(expected)
