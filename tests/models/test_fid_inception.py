"""The standard FID network without torchvision: the FID Inception v3 (torch-fidelity's
`inception-v3-compat`), its weights from a local copy of torch-fidelity's release file through
the model store, and the label the report gives it.

The release file cannot exist here (no downloads): `fid_weights` is a file of its names and
shapes with random values, whose sha256 the tests pass as the "pinned" one.
"""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import encode, photo
from safetensors.torch import load_file, save_file

from blipinpaint import builders
from blipinpaint.config import load_config
from blipinpaint.errors import ConfigError
from blipinpaint.models import ModelRef, describe_fid_features, fid_store, load_fid_features, store
from blipinpaint.models.fid_inception import FidInceptionV3, expected_shapes, resize_like_tf1
from blipinpaint.models.presets import FID_INCEPTION_SHA256, FID_INCEPTION_URL
from blipinpaint.report_markdown import fid_protocol
from blipinpaint.storage import filesystem

CPU = torch.device("cpu")

# torch-fidelity's state dict, as its source gives it (torch_fidelity/feature_extractor_inceptionv3.py
# and utils/util_convert_inception_weights.py at v0.4.0): some weights by name, and the totals
# (94 convolutions with their batch norms, 5 tensors each, and `fc`; no num_batches_tracked),
# counted on torch-fidelity's own extractor.
TORCH_FIDELITY_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3), "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3), "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "fc.weight": (1008, 2048), "fc.bias": (1008,),
}
TENSORS, NUMBERS = 472, 23_885_392


def test_the_network_takes_torch_fidelitys_weights_by_their_names():
    shapes = expected_shapes()
    assert {k: shapes.get(k) for k in TORCH_FIDELITY_SHAPES} == TORCH_FIDELITY_SHAPES
    assert (len(shapes), sum(int(np.prod(s)) for s in shapes.values())) == (TENSORS, NUMBERS)


def tf1_resize_reference(images: np.ndarray, size: int) -> np.ndarray:
    """TensorFlow 1.x's `resize_bilinear(align_corners=False)`, written from its definition:
    output pixel i reads input coordinate i * in/out (in float32, as TensorFlow computes it),
    blending the pixel below and the next one (the last row and column repeat), in float64."""
    def axis(n_in: int):
        where = np.arange(size, dtype=np.float32) * np.float32(n_in / size)
        lo = np.floor(where).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), (where - lo).astype(np.float64)

    (r0, r1, fr), (c0, c1, fc) = axis(images.shape[2]), axis(images.shape[3])
    x = images.astype(np.float64)
    rows = x[:, :, r0] + (x[:, :, r1] - x[:, :, r0]) * fr[None, None, :, None]
    return rows[..., c0] + (rows[..., c1] - rows[..., c0]) * fc


def test_images_are_resized_as_tensorflow_1x_and_scaled_as_fid_does():
    rng = np.random.default_rng(0)
    for shape in ((2, 3, 13, 40), (1, 3, 600, 500)):  # up, and down without antialiasing
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = tf1_resize_reference(images, 299)
        resized = resize_like_tf1(torch.from_numpy(images).float(), 299)
        assert resized.shape == (shape[0], 3, 299, 299)
        assert np.abs(resized.numpy() - expected).max() < 1e-3
        prepared = FidInceptionV3.prepare(torch.from_numpy(images))
        assert np.abs(prepared.numpy() - (expected - 128) / 128).max() < 1e-5
        # Not torch's resize (half-pixel centres), with or without antialiasing: FID's numbers differ.
        for antialias in (False, True):
            torch_resized = F.interpolate(torch.from_numpy(images).float(), size=(299, 299), mode="bilinear",
                                          align_corners=False, antialias=antialias)
            assert np.abs(torch_resized.numpy() - expected).max() > 1
    at_size = torch.from_numpy(rng.integers(0, 256, (1, 3, 299, 299), dtype=np.uint8))
    assert torch.equal(resize_like_tf1(at_size.float(), 299), at_size.float())
    with pytest.raises(ValueError, match="uint8 images"):
        FidInceptionV3.prepare(at_size.float())


def stored_entry(fid_weights, root: Path) -> str:
    """The model store's entry made from the weights file, its sha256 the pinned one."""
    path, sha = fid_weights
    uri = str(root / "store" / "fid")
    store.put(ModelRef(str(path)), uri, fid_store.weights_file_source(str(path), sha, root / "dl", pinned_sha256=sha))
    return uri


@pytest.fixture(scope="module")
def entry(fid_weights, tmp_path_factory):
    return stored_entry(fid_weights, tmp_path_factory.mktemp("fid-entry"))


def test_a_local_copy_of_the_standard_weights_is_verified_and_converted_once(fid_weights, entry):
    path, sha = fid_weights
    record = store.manifest(entry)
    assert record["source"] == {"url": FID_INCEPTION_URL, "sha256": sha}  # the download's entry: the same bytes
    weights = record["files"]["model.safetensors"]
    assert weights["from"] == str(path) and weights["hub_id"] == sha and "equals the pinned" in weights["verified"]
    original, converted = torch.load(path, weights_only=True), load_file(f"{entry}/model.safetensors")
    assert converted.keys() == original.keys() and all(torch.equal(converted[k], original[k]) for k in original)
    # Its label follows the record: standard against its pin, not standard against the real one.
    network = describe_fid_features(ModelRef(entry), pinned_sha256=sha)
    assert network["standard"] and network["network"] == "inception-v3-compat"
    assert fid_protocol(load_config(), network).startswith("standard FID: Inception v3 pool3 (2048-d)")
    assert not describe_fid_features(ModelRef(entry))["standard"]


def fid_batch(n: int = 2) -> dict[str, np.ndarray]:
    rows = [encode(photo(64, 64, seed=i), "PNG") for i in range(n)]
    return {"id": np.array([f"s{i}" for i in range(n)], dtype=object), "mask_area": np.full(n, 0.2),
            "image_png": np.array(rows, dtype=object)}


def test_the_jobs_loader_gives_deterministic_2048_d_features(entry, tmp_path):
    """`build_fid`, as each FID worker calls it, on the store entry: the FID Inception, its
    features 2048-d, the same on a second pass and for an image alone as in a batch."""
    cfg = load_config(overrides=[f"run_dir={tmp_path}", f"models.fid.name_or_path={entry}"])
    sets = {"real": "image_png"}
    first, second = builders.build_fid(cfg, sets), builders.build_fid(cfg, sets)
    assert isinstance(first.net, FidInceptionV3) and not first.net.training
    batch = fid_batch()
    features = first(batch)["real"]
    assert features.shape == (2, 2048) and features.dtype == np.float32 and np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).max() > 1e-3  # two images, two feature vectors
    alone = second({k: v[:1] for k, v in batch.items()})["real"]
    np.testing.assert_allclose(alone[0], features[0], rtol=1e-5, atol=1e-5)
    assert np.array_equal(load_fid_features(ModelRef(entry), CPU)(torch.from_numpy(
        np.stack([np.asarray(photo(64, 64, seed=0))])).permute(0, 3, 1, 2)).numpy(), alone)


def test_other_weights_load_only_named_and_labelled_not_standard(fid_weights, tmp_path):
    """The test's weights are not the real pinned file: taken as `models.fid`, they are refused
    until named by their sha256, and then load as a network the report calls non-standard.
    The workers find the entry by the name alone (the file is gone when they load)."""
    path, sha = fid_weights
    copy = tmp_path / "mirror" / "inception.pth"
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    args = [f"run_dir={tmp_path / 'run'}", f"models.fid.name_or_path={copy}"]
    with pytest.raises(store.StoreError, match=f"not the standard FID Inception weights.*models.fid.revision={sha}"):
        builders.fill_store(load_config(overrides=args))
    cfg = load_config(overrides=[*args, f"models.fid.revision={sha}"])
    entry = builders.fill_store(cfg)["fid"]
    assert entry["source"] == {"sha256": sha} and "not the standard FID weights" in entry["files"][
        "model.safetensors"]["verified"]
    copy.unlink()
    network = builders.fid_network(cfg)
    assert (network["network"], network["standard"]) == ("inception-v3-compat", False)
    assert f"not the pinned standard {FID_INCEPTION_SHA256}" in network["evidence"]
    protocol = fid_protocol(cfg)
    assert "not the standard Inception weights" in protocol and "do not compare with published ones" in protocol
    assert isinstance(builders.build_fid(cfg, {"real": "image_png"}).net, FidInceptionV3)


def test_a_folder_of_the_network_is_labelled_by_its_record_not_its_name(entry, fid_weights, tmp_path):
    """A copy of a store entry (a mirror of another run's `models/`) loads as the FID Inception;
    the report calls it standard only while its weights are the ones its record says were
    converted from the pinned file."""
    _, sha = fid_weights
    folder = tmp_path / "copied"
    shutil.copytree(entry, folder)
    cfg = load_config(overrides=[f"run_dir={tmp_path}", f"models.fid.name_or_path={folder}"])
    assert describe_fid_features(builders.resolve_preset(cfg).fid, pinned_sha256=sha)["standard"]
    state = load_file(folder / "model.safetensors")
    state["fc.bias"] = state["fc.bias"] + 1  # other weights under the same config.json and record
    save_file(state, str(folder / "model.safetensors"))
    altered = describe_fid_features(ModelRef(str(folder)), pinned_sha256=sha)
    assert not altered["standard"] and "not the file the model store wrote" in altered["evidence"]
    (folder / "_store.json").unlink()
    unrecorded = describe_fid_features(ModelRef(str(folder)), pinned_sha256=sha)
    assert not unrecorded["standard"] and "no model store record" in unrecorded["evidence"]


def test_the_weights_file_may_lie_in_a_bucket(s3, tmp_path):
    """A mirror in a bucket: the driver copies the file, checks its sha256 and keeps it by it
    (then converts it as any local file); other bytes leave nothing behind."""
    bucket = s3("fid-mirror")
    fs, where = filesystem(f"{bucket}/weights/inception.pth")
    with fs.open_output_stream(where) as f:
        f.write(b"the weights")
    sha = hashlib.sha256(b"the weights").hexdigest()
    with pytest.raises(store.StoreError, match="not the standard FID Inception weights"):
        fid_store.local_weights(f"{bucket}/weights/inception.pth", FID_INCEPTION_SHA256, tmp_path / "dl")
    assert list((tmp_path / "dl").iterdir()) == []
    kept = fid_store.local_weights(f"{bucket}/weights/inception.pth", sha, tmp_path / "dl", pinned_sha256=sha)
    assert kept == tmp_path / "dl" / sha and kept.read_bytes() == b"the weights"


def test_a_folder_holding_the_weights_file_stands_for_the_file(fid_weights, tmp_path):
    """torch's hub cache, say: a folder without config.json holding the release file."""
    path, _ = fid_weights
    cfg = load_config(overrides=[f"run_dir={tmp_path}", f"models.fid.name_or_path={path.parent}"])
    assert cfg.models.fid.name_or_path == str(path) and builders.stored_refs(cfg).keys() == {"fid"}


def test_a_file_that_is_not_the_networks_state_dict_is_refused_at_the_store(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.ones(3, 2)}, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(store.StoreError, match="not torch-fidelity's inception-v3-compat state dict: 471 missing"):
        store.put(ModelRef(str(path)), str(tmp_path / "entry"), fid_store.weights_file_source(str(path), sha, tmp_path))
    assert not store.is_complete(str(tmp_path / "entry"))


def test_weights_files_are_for_the_fid_role_and_named_by_sha256(tmp_path):
    with pytest.raises(ConfigError, match="models.fid.revision='main': for a weights file it is the file's sha256"):
        load_config(overrides=["models.fid.name_or_path=/mirror/inception.pth", "models.fid.revision=main"])
    with pytest.raises(ConfigError, match="models.captioner.name_or_path='/x/blip.pth': a weights file"):
        load_config(overrides=["models.captioner.name_or_path=/x/blip.pth"])


def test_equal_to_torch_fidelitys_extractor_where_it_imports(fid_weights):
    """The check against the reference itself, where torch-fidelity imports (GPU machines with
    their torchvision). Here its import fails (TRAPS.md); the network was compared with its
    source's extractor bit for bit when written (inputs of 64², 512², 299², 37x120, 600x500)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError) as err:  # torchvision's CUDA build fails with a RuntimeError
        pytest.skip(f"torch-fidelity cannot be imported here: {type(err).__name__}: {str(err).splitlines()[0]}")
    path, _ = fid_weights
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    ours = FidInceptionV3()
    ours.load_state_dict(torch.load(path, weights_only=True))
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 37, 120), dtype=np.uint8))
    assert torch.equal(ours(images), reference(images)[0])
