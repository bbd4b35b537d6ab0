import json
import shutil

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import encode, photo

from blipinpaint.config import sample_images_dir
from blipinpaint.io import decode_png
from blipinpaint.records import METRIC_COLUMNS
from rayjobs import pipeline


def test_main_job_accounts_for_every_input(tmp_path, model_cache):
    source = tmp_path / "images"
    source.mkdir()
    for name in ("astronaut.jpg", "chelsea.jpg", "coins.png"):
        shutil.copy(sample_images_dir() / name, source / name)
    (source / "notes.jpg").write_text("not a picture")
    (source / "empty.png").write_bytes(b"")
    jpeg = encode(photo(), "JPEG")
    (source / "sub").mkdir()
    (source / "sub" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    run_dir = tmp_path / "run"

    assert pipeline.main([f"run_dir={run_dir}", f"data.source={source}", "masks.kind=mixed"]) == 0

    out = run_dir / "generate"
    samples = pq.read_table(out / "samples").to_pandas()
    errors = pq.read_table(out / "errors").to_pandas()
    assert sorted(samples["id"]) == ["astronaut.jpg", "chelsea.jpg", "coins.png"]
    assert dict(zip(errors["id"], errors["error"].str.split(":").str[0])) == {
        "empty.png": "empty file", "notes.jpg": "not an image", "sub/cut.jpg": "corrupt image",
    }
    assert set(samples.columns) >= {"id", "caption", "caption_features", "mask_area", *METRIC_COLUMNS}
    row = samples.iloc[0]
    assert decode_png(row["inpainted_png"]).shape == (64, 64, 3)
    assert decode_png(row["mask_png"]).mean() / 255 == pytest.approx(row["mask_area"])
    assert len(row["caption_features"]) == 32

    stats = json.loads((out / "stats.json").read_text())
    assert (stats["inputs"], stats["ok"], stats["errors"]) == (6, 3, 3)
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["source"] == str(source)
