from rayjobs import evaluate


def test_missing_steps_are_named(tmp_path, capsys):
    assert evaluate.main([f"run_dir={tmp_path}"]) == 2
    assert "generate/samples is missing: run rayjobs.generate first" in capsys.readouterr().err
    (tmp_path / "generate" / "samples").mkdir(parents=True)
    assert evaluate.main([f"run_dir={tmp_path}"]) == 2
    assert "blip/model.safetensors is missing: run rayjobs.finetune_blip first" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_the_report_states_the_fid_protocol():
    """Point 8: the standard FID resizes like TensorFlow 1.x, without antialiasing; the report says
    which protocol its numbers follow, and that the offline network's do not compare."""
    from blipinpaint.config import load_config

    standard = evaluate.fid_protocol(load_config(overrides=["models.preset=paper"]))
    assert "TensorFlow 1.x's bilinear resize and no antialiasing" in standard and "299x299" in standard
    assert "do not compare with published ones" in evaluate.fid_protocol(load_config())
