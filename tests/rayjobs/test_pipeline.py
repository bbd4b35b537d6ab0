import json

import pyarrow.parquet as pq

from rayjobs import pipeline


def test_main_job_on_the_embedded_default(local_ray, tmp_path, capsys):
    """The README's main command: the tiny preset on the shipped photographs."""
    assert pipeline.main([f"run_dir={tmp_path}"]) == 0
    stats = json.loads((tmp_path / "generate" / "stats.json").read_text())
    assert (stats["inputs"], stats["ok"], stats["errors"]) == (6, 6, 0)
    samples = pq.read_table(tmp_path / "generate" / "samples")
    assert samples.num_rows == 6 and len(set(samples.column("caption").to_pylist())) > 1
    out = capsys.readouterr().out
    assert "6 inputs: 6 samples, 0 errors;" in out and "clip_score" in out


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert pipeline.main([f"run_dir={run_dir}", "data.kind=coco"]) == 2  # COCO without data.image_root
    assert "data.image_root must be set" in capsys.readouterr().err
    assert not run_dir.exists()
