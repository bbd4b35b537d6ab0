import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pyarrow import fs as pafs

from blipinpaint import storage
from blipinpaint.models import store
from blipinpaint.models.presets import ModelRef
from blipinpaint.scorer import ScoreNet, ScoreNetConfig
from blipinpaint.storage import MANIFEST, FolderError


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
    (tmp_path / "config.json").write_text("{}")
    storage.upload_dir(tmp_path, str(tmp_path))  # the folder itself: nothing to copy, the manifest written
    assert list(json.loads((tmp_path / MANIFEST).read_text())["files"]) == ["config.json"]


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


def _cache(tmp_path) -> list[str]:
    """What this node's folder cache holds (staging folders included)."""
    folder = tmp_path / "cache" / "folders"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_published_folder_lists_its_files_and_is_named_by_them(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPINPAINT_CACHE", str(tmp_path / "cache"))
    local = _model_folder(tmp_path / "model", b"weights")
    (local / "tokenizer").mkdir()
    (local / "tokenizer" / "vocab.txt").write_text("[PAD]\n[DEC]\n")
    bucket = s3("published")
    storage.upload_dir(local, f"{bucket}/a/model")

    listed = json.loads(storage.read_text(f"{bucket}/a/model/{MANIFEST}"))["files"]
    on_disk = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert listed == {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for name, data in on_disk.items()}
    digest = hashlib.sha256(storage.filesystem(f"{bucket}/a/model")[0]
                            .open_input_stream(f"published/a/model/{MANIFEST}").read()).hexdigest()
    assert storage.folder_digest(f"{bucket}/a/model") == digest
    assert storage.folder_digest(str(local)) == digest  # a local folder without a manifest: hashed on the spot

    copy = storage.local_dir(f"{bucket}/a/model")
    assert Path(copy).name == digest and storage.folder_digest(copy) == digest
    assert {p.relative_to(copy).as_posix() for p in Path(copy).rglob("*") if p.is_file()} == {*on_disk, MANIFEST}
    # Keyed by content, not by the URI: the same files elsewhere are the same copy.
    storage.upload_dir(local, f"{bucket}/b/model")
    assert storage.local_dir(f"{bucket}/b/model") == copy and _cache(tmp_path) == [digest]
    (local / "model.safetensors").write_bytes(b"weightz")
    assert storage.folder_digest(str(local)) != digest


def test_a_folder_without_a_manifest_is_refused_until_one_is_written(s3, tmp_path, monkeypatch):
    """A folder copied by hand, or uploaded before folders had manifests: nothing says what it
    should hold, so no node trusts its name."""
    monkeypatch.setenv("BLIPINPAINT_CACHE", str(tmp_path / "cache"))
    local = _model_folder(tmp_path / "model", b"weights")
    uri = f"{s3('by-hand')}/blip"
    fs, path = storage.filesystem(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    assert not storage.is_published(uri)
    for use in (storage.local_dir, storage.folder_digest):
        with pytest.raises(FolderError, match=f"{uri} has no {MANIFEST}.*train again.*write_manifest"):
            use(uri)
    assert _cache(tmp_path) == []
    assert storage.write_manifest(uri) == storage.folder_digest(str(local)) == storage.folder_digest(uri)
    assert (Path(storage.local_dir(uri)) / "model.safetensors").read_bytes() == b"weights"


def test_files_that_differ_from_their_manifest_are_refused_and_leave_nothing(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPINPAINT_CACHE", str(tmp_path / "cache"))
    bucket = s3("altered")
    fs, _ = storage.filesystem(bucket)
    for case, changed in {"same-size": "weightz", "shorter": "w"}.items():
        uri = f"{bucket}/{case}"
        storage.upload_dir(_model_folder(tmp_path / case, b"weights"), uri)
        storage.write_text(f"{uri}/model.safetensors", changed)
        with pytest.raises(FolderError, match=f"{uri}/model.safetensors: .* bytes with sha256 .* but the folder's "
                                              f"{MANIFEST} lists 7 bytes with sha256 "
                                              f"{hashlib.sha256(b'weights').hexdigest()}"):
            storage.local_dir(uri)
        assert _cache(tmp_path) == [], case  # nothing half-copied or unverified left behind

    uri = f"{bucket}/missing"
    storage.upload_dir(_model_folder(tmp_path / "missing", b"weights"), uri)
    fs.delete_file(storage.filesystem(f"{uri}/config.json")[1])
    with pytest.raises(FolderError, match=f"{uri}/config.json is listed in the folder's {MANIFEST} but missing"):
        storage.local_dir(uri)
    assert _cache(tmp_path) == []

    listed = {"sha256": "0" * 64, "size": 1}
    for bad in (b"not json", json.dumps({"files": {}}).encode(),
                json.dumps({"format": storage.MANIFEST_FORMAT, "files": {"../../outside": listed}}).encode(),
                json.dumps({"format": storage.MANIFEST_FORMAT, "files": {"x": {"size": 1}}}).encode()):
        with fs.open_output_stream(storage.filesystem(f"{uri}/{MANIFEST}")[1]) as f:
            f.write(bad)
        with pytest.raises(FolderError, match=f"{uri}/{MANIFEST}"):
            storage.local_dir(uri)
    assert _cache(tmp_path) == [] and not (tmp_path / "outside").exists()


def test_a_local_folder_whose_manifest_differs_from_its_files_has_no_digest(tmp_path):
    local = _model_folder(tmp_path / "model", b"weights")
    storage.upload_dir(local, str(tmp_path / "published"))
    digest = storage.folder_digest(str(tmp_path / "published"))
    assert digest == storage.folder_digest(str(local))
    (tmp_path / "published" / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(FolderError, match="model.safetensors: 7 bytes with sha256"):
        storage.folder_digest(str(tmp_path / "published"))


def test_a_node_copy_altered_after_it_was_made_is_refused(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPINPAINT_CACHE", str(tmp_path / "cache"))
    uri = f"{s3('node-copy')}/model"
    storage.upload_dir(_model_folder(tmp_path / "model", b"weights"), uri)
    copy = Path(storage.local_dir(uri))
    with open(copy / "model.safetensors", "r+b") as f:
        f.truncate(3)
    with pytest.raises(FolderError, match=f"this node's copy {copy} was altered.*model.safetensors is 3 bytes, not 7"):
        storage.local_dir(uri)
    (copy / "model.safetensors").unlink()
    with pytest.raises(FolderError, match="model.safetensors is missing"):
        storage.local_dir(uri)


def test_an_upload_that_fails_leaves_the_folder_incomplete_not_old(tmp_path, monkeypatch):
    """The old manifest goes first: a reader during (or after) a failed upload sees no folder,
    never the old manifest over new files."""
    fake_bucket(monkeypatch, tmp_path)
    uri = "s3://bucket/run/scorer/model"
    storage.upload_dir(_model_folder(tmp_path / "first", b"first"), uri)
    assert storage.is_published(uri)
    second = _model_folder(tmp_path / "second", b"second")
    (second / "tokenizer.json").write_text("{}")
    (tmp_path / "bucket" / "run" / "scorer" / "model" / "tokenizer.json").mkdir()  # this file cannot be written
    with pytest.raises(OSError):
        storage.upload_dir(second, uri)
    assert not storage.is_published(uri)
    with pytest.raises(FolderError, match="has no"):
        storage.local_dir(uri)


CHILD = """
import sys
from pyarrow import fs as pafs
from blipinpaint import storage
if sys.argv[1] != "s3":
    storage._remote = lambda _: pafs.SubTreeFileSystem(sys.argv[1], pafs.LocalFileSystem())
print(storage.local_dir(sys.argv[2]), flush=True)
"""


def _child(root: str, uri: str, cache: Path) -> subprocess.Popen:
    """Another process of this node asking for `uri` (`root`: a fake bucket's folder, or "s3")."""
    env = {**os.environ, "BLIPINPAINT_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", CHILD, root, uri], env=env, stdout=subprocess.PIPE, text=True)


def test_a_copy_killed_midway_leaves_nothing_taken_for_whole(tmp_path, monkeypatch):
    """A process killed while copying (no `finally` runs) leaves its staging folder; it is never
    a copy, and the next process on the node removes it."""
    fake_bucket(monkeypatch, tmp_path)
    uri = "s3://bucket/model"
    storage.upload_dir(_model_folder(tmp_path / "model", b"weights"), uri)
    weights = tmp_path / "bucket" / "model" / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)  # reading it blocks: the copy stops halfway, config.json copied
    child = _child(str(tmp_path), uri, tmp_path / "cache")
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "cache" / "folders").glob(".staging-*/config.json")):
            assert time.monotonic() < deadline and child.poll() is None, "the copy never started"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert [name.startswith(".staging-") for name in _cache(tmp_path)] == [True]
    weights.unlink()
    weights.write_bytes(b"weights")
    copy = storage.local_dir(uri)
    assert _cache(tmp_path) == [Path(copy).name]  # the dead process's staging folder is gone
    assert (Path(copy) / "model.safetensors").read_bytes() == b"weights"


def test_processes_and_threads_asking_at_once_all_get_a_whole_copy(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPINPAINT_CACHE", str(tmp_path / "cache"))
    uri = f"{s3('at-once')}/model"
    storage.upload_dir(_model_folder(tmp_path / "model", os.urandom(16 << 20)), uri)
    digest = storage.folder_digest(uri)
    children = [_child("s3", uri, tmp_path / "cache") for _ in range(3)]
    with ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(lambda _: storage.local_dir(uri), range(4)))
    copies += [child.communicate(timeout=300)[0].strip() for child in children]
    assert [child.returncode for child in children] == [0, 0, 0]
    assert set(copies) == {str(tmp_path / "cache" / "folders" / digest)}
    assert storage.folder_digest(copies[0]) == digest  # each file checked against the manifest
    assert _cache(tmp_path) == [digest]


def test_a_model_store_entry_in_a_bucket_carries_both_manifests(s3, tmp_path, monkeypatch):
    """The store's `_store.json` (what the entry was made from) is written after the folder's
    `_manifest.json` (what it holds): neither names the other, and a node copy holds the model."""
    monkeypatch.setenv("BLIPINPAINT_CACHE", str(tmp_path / "cache"))
    model = ScoreNet(ScoreNetConfig(in_features=4, hidden=(8,)))

    def fill(staging: Path) -> dict:
        model.save_pretrained(staging)
        return {"model.safetensors": {"how": "written", "sha256": store.sha256(staging / "model.safetensors")}}

    uri = f"{s3('store-entry')}/models/scorer/1"
    store.put(ModelRef("scorer"), uri, store.Source("scorer/1", {"made": "here"}, fill))
    assert store.is_complete(uri) and storage.is_published(uri)
    assert set(json.loads(storage.read_text(f"{uri}/{MANIFEST}"))["files"]) == {"config.json", "model.safetensors"}
    copy = storage.local_dir(uri)
    assert ScoreNet.from_pretrained(copy).config == model.config
    assert not (Path(copy) / store.MANIFEST).exists()
