import json

import pyarrow.parquet as pq
from transformers import BlipForConditionalGeneration

from rayjobs import pipeline


def test_main_job_runs_every_step_and_reuses_them(local_ray, tmp_path, capsys, monkeypatch):
    """The README's main command (fewer epochs): generate -> train_scorer -> finetune_blip.

    With a relative run_dir, as the default is: workers must write where the driver reads."""
    monkeypatch.chdir(tmp_path)
    args = ["run_dir=run", "scorer.epochs=2", "finetune.epochs=1"]
    tmp_path = tmp_path / "run"
    assert pipeline.main(args) == 0
    stats = json.loads((tmp_path / "generate" / "stats.json").read_text())
    assert (stats["inputs"], stats["ok"], stats["errors"]) == (6, 6, 0)
    samples = pq.read_table(tmp_path / "generate" / "samples")
    assert samples.num_rows == 6 and len(set(samples.column("caption").to_pylist())) > 1
    assert (tmp_path / "scorer" / "model" / "model.safetensors").exists()
    BlipForConditionalGeneration.from_pretrained(tmp_path / "blip", use_safetensors=True)
    out = capsys.readouterr().out
    assert "6 inputs: 6 samples, 0 errors;" in out and "scorer: 2 epochs" in out and "fine-tuned BLIP" in out

    assert pipeline.main(args) == 0  # everything is reused: nothing trains twice
    out = capsys.readouterr().out
    assert "skipped 6 already committed" in out and "scorer:" not in out and "fine-tuned" not in out


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert pipeline.main([f"run_dir={run_dir}", "data.kind=coco"]) == 2  # COCO without data.image_root
    assert "data.image_root must be set" in capsys.readouterr().err
    assert not run_dir.exists()
