from rayjobs import evaluate


def test_missing_steps_are_named(tmp_path, capsys):
    assert evaluate.main([f"run_dir={tmp_path}"]) == 2
    assert "generate/samples is missing: run rayjobs.generate first" in capsys.readouterr().err
    (tmp_path / "generate" / "samples").mkdir(parents=True)
    assert evaluate.main([f"run_dir={tmp_path}"]) == 2
    assert "blip/model.safetensors is missing: run rayjobs.finetune_blip first" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
