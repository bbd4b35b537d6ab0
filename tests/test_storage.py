from pathlib import Path

from pyarrow import fs as pafs

from blipinpaint import storage
from blipinpaint.scorer import ScoreNet, ScoreNetConfig


def fake_bucket(monkeypatch, root):
    """s3://bucket/... served from a local folder, through the same code as a real bucket."""
    monkeypatch.setattr(storage, "_remote", lambda _: pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()))
    monkeypatch.setenv("BLIPINPAINT_CACHE", str(root / "cache"))


def test_a_model_folder_goes_to_a_bucket_and_back(monkeypatch, tmp_path):
    fake_bucket(monkeypatch, tmp_path)
    model = ScoreNet(ScoreNetConfig(in_features=4, hidden=(8,)))
    model.save_pretrained(tmp_path / "saved")
    storage.upload_dir(tmp_path / "saved", "s3://bucket/run/scorer/model")
    assert storage.is_file("s3://bucket/run/scorer/model/model.safetensors")
    assert (tmp_path / "bucket" / "run" / "scorer" / "model" / "config.json").exists()

    local = storage.local_dir("s3://bucket/run/scorer/model")
    assert local.startswith(str(tmp_path / "cache"))
    assert storage.local_dir("s3://bucket/run/scorer/model") == local  # downloaded once per node
    assert ScoreNet.from_pretrained(local).config == model.config


def test_local_paths_are_used_in_place(tmp_path):
    assert storage.local_dir(str(tmp_path)) == str(tmp_path)
    assert storage.local_dir(f"file://{tmp_path}") == str(tmp_path)
    storage.upload_dir(tmp_path, str(tmp_path))  # the folder itself: nothing to copy


def test_text_and_jsonl(tmp_path):
    uri = str(tmp_path / "a" / "log.jsonl")
    assert storage.read_jsonl(uri) == [] and not storage.exists(uri)
    storage.write_jsonl(uri, [{"epoch": 0}, {"epoch": 1}])
    assert storage.read_jsonl(uri) == [{"epoch": 0}, {"epoch": 1}]
    assert storage.read_text(uri).count("\n") == 2


def _model_folder(path, weights: bytes):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"hidden": [8]}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_a_folder_retrained_in_its_bucket_is_loaded_anew(s3, tmp_path, monkeypatch):
    """The docs' retraining: delete `run_dir/scorer` in the bucket, train again. A node that
    loaded the first model must load the second, not its copy of the first."""
    monkeypatch.setenv("BLIPINPAINT_CACHE", str(tmp_path / "cache"))
    uri = f"{s3('retrained')}/run/scorer/model"
    storage.upload_dir(_model_folder(tmp_path / "first", b"first training"), uri)
    assert (Path(storage.local_dir(uri)) / "model.safetensors").read_bytes() == b"first training"

    fs, path = storage.filesystem(uri)
    fs.delete_dir(path)
    storage.upload_dir(_model_folder(tmp_path / "second", b"second training"), uri)
    assert (Path(storage.local_dir(uri)) / "model.safetensors").read_bytes() == b"second training"
