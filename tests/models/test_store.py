"""The model store on the `paper` preset's real file layouts (tiny weights, the hub offline)."""

import fnmatch
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from hub_rehearsal import listing
from safetensors import safe_open
from safetensors.torch import load_file

from blipinpaint.config import load_config
from blipinpaint.models import ModelRef, fid_store, load_captioner, load_clip, load_inpaint_pipeline, store
from blipinpaint.models.presets import PAPER
from blipinpaint.storage import filesystem

CPU = torch.device("cpu")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack")


@pytest.fixture(scope="module")
def stored(paper_hub, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("store"))
    return {role: store.put(getattr(PAPER, role), store.entry_uri(root, getattr(PAPER, role))) | {
        "uri": store.entry_uri(root, getattr(PAPER, role))} for role in ("captioner", "inpainter", "clip")}


def weights(folder: str) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.suffix in WEIGHT_SUFFIXES)


def test_the_pickle_only_blip_revision_becomes_a_safetensors_captioner(stored):
    """Point 1: at its pinned revision BLIP ships `pytorch_model.bin` only; the store converts it."""
    entry = stored["captioner"]
    assert weights(entry["uri"]) == ["model.safetensors"]
    assert entry["files"]["model.safetensors"]["from"] == "pytorch_model.bin"
    assert entry["files"]["model.safetensors"]["how"].startswith("pickle converted")
    captioner = load_captioner(ModelRef(entry["uri"]), CPU, torch.bfloat16)
    assert captioner.model.dtype == torch.bfloat16
    assert captioner.model.config.text_config.bos_token_id == len(captioner.tokenizer)  # BLIP's [DEC] id


def test_the_sd_revision_loads_from_its_fp16_safetensors(stored):
    """Point 2: no fp32 safetensors at the pinned SD revision; the fp16 ones are stored as the weights."""
    entry = stored["inpainter"]
    assert weights(entry["uri"]) == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                                     "vae/diffusion_pytorch_model.safetensors"]
    assert entry["files"]["unet/diffusion_pytorch_model.safetensors"]["from"] == \
        "unet/diffusion_pytorch_model.fp16.safetensors"
    with safe_open(f"{entry['uri']}/unet/diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == torch.float16 and f.get_tensor("conv_in.weight").shape[1] == 9
    pipe = load_inpaint_pipeline(ModelRef(entry["uri"]), CPU, torch.float32)
    assert pipe.unet.dtype == torch.float32 and type(pipe.scheduler).__name__ == "DDIMScheduler"
    # The VAE's attention keys in SD 1.x's legacy names were renamed on load, not lost.
    assert not any(torch.isnan(p).any() for p in pipe.vae.parameters())


def test_clip_loads_from_its_safetensors_and_nothing_else_is_fetched(stored):
    entry = stored["clip"]
    assert weights(entry["uri"]) == ["model.safetensors"]
    assert load_clip(ModelRef(entry["uri"]), CPU).tokenizer.eos_token_id == 49407


def snapshot(hub: Path, ref: ModelRef) -> Path:
    """The folder of `ref`'s pinned commit in the rehearsal's hub cache: the files the store read."""
    return hub / f"models--{ref.name_or_path.replace('/', '--')}" / "snapshots" / ref.revision


def test_each_entry_is_exactly_what_its_manifest_lists(stored, paper_hub):
    """The manifest is the entry's record for the workers' nodes: every file, its origin, its sha256.

    Checked with digests computed here (hashlib, not the store's helper) on the bytes as they lie
    in the store and in the hub cache they came from: a wrong hash recorded, or wrong bytes written
    under a right-looking record, fails.
    """
    for role, entry in stored.items():
        ref, folder = getattr(PAPER, role), Path(entry["uri"])
        hub = snapshot(paper_hub, ref)
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {store.MANIFEST}
        assert files == set(entry["files"]), role
        # Made from exactly the files of the revision that the preset names, each once.
        named = {p.relative_to(hub).as_posix() for p in hub.rglob("*") if p.is_file()
                 and any(fnmatch.fnmatchcase(p.relative_to(hub).as_posix(), pattern) for pattern in ref.files)}
        origins = [record["from"] for record in entry["files"].values()]
        assert sorted(origins) == sorted(named), role
        for name, record in entry["files"].items():
            content, source = (folder / name).read_bytes(), hub / record["from"]
            assert record["sha256"] == hashlib.sha256(content).hexdigest(), (role, name)
            assert record["hub_id"] == Path(os.path.realpath(source)).name, (role, name)  # its blob's name
            if source.name.endswith((".bin", ".pth", ".pt")):  # a pickle: the same tensors, now as safetensors
                original = torch.load(source, map_location="cpu", weights_only=True)
                converted = load_file(folder / name)
                assert converted.keys() == original.keys(), (role, name)
                assert all(torch.equal(converted[k], original[k]) for k in original), (role, name)
            else:  # copied: the hub's bytes, unchanged
                assert content == source.read_bytes(), (role, name)


def test_drivers_filling_one_store_at_once_publish_one_whole_entry(paper_hub, tmp_path):
    uri = store.entry_uri(str(tmp_path), PAPER.clip)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.put(PAPER.clip, uri))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and store.is_complete(uri)
    assert [p.name for p in Path(uri).parent.iterdir()] == [PAPER.clip.revision]  # no staging left behind
    assert load_clip(ModelRef(uri), CPU).tokenizer.eos_token_id == 49407


@pytest.mark.parametrize("name, hub", [
    ("Salesforce/blip-image-captioning-base", True), ("runs/x/blip", False), ("blip", False), ("/abs/org/name", False),
    ("s3://bucket/blip", False), ("file:///abs/blip", False), ("torchmetrics:inception-v3-compat", False),
])
def test_what_counts_as_a_hub_id(name, hub):
    assert store.is_hub_ref(ModelRef(name)) is hub


def test_a_complete_entry_is_reused_and_a_different_one_refused(stored):
    entry = stored["captioner"]
    assert store.put(PAPER.captioner, entry["uri"])["reused"]
    other = ModelRef(PAPER.captioner.name_or_path, PAPER.captioner.revision, ["config.json", "pytorch_model.bin"])
    with pytest.raises(store.StoreError, match="use another models.store"):
        store.put(other, entry["uri"])


def test_a_file_the_revision_lacks_is_named(paper_hub):
    ref = ModelRef(PAPER.captioner.name_or_path, PAPER.captioner.revision, ["config.json", "model.safetensors"])
    with pytest.raises(store.StoreError, match="has no file 'model.safetensors'"):
        store.fetch(ref)


def fake_blob(tmp_path: Path, content: bytes, named_by: bytes | None = None) -> Path:
    """A file of a hub cache: its blob named by the sha256 of `named_by` (default: its content)."""
    blob = tmp_path / "blobs" / hashlib.sha256(named_by or content).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(content)
    link = tmp_path / "snapshots" / "c" / "pytorch_model.bin"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    return link.parent


def test_an_altered_file_is_refused_before_it_is_read(tmp_path):
    real = b"the pinned weights"
    folder = fake_blob(tmp_path, b"altered weights", named_by=real)
    with pytest.raises(store.StoreError, match="differs from the hub's"):
        store.convert(folder, ["pytorch_model.bin"], tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


class Payload:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


def test_a_pickle_holding_code_is_refused_unrun(tmp_path, capsys):
    path = tmp_path / "payload.bin"
    torch.save({"weight": torch.ones(2), "extra": Payload()}, path)
    folder = fake_blob(tmp_path / "cache", path.read_bytes())  # its hash matches: only unpickling can catch it
    with pytest.raises(store.StoreError, match="objects other than tensors"):
        store.convert(folder, ["pytorch_model.bin"], tmp_path / "out")
    assert "ran code" not in capsys.readouterr().out


@pytest.fixture
def served(tmp_path, fid_weights):
    """A file server on 127.0.0.1 standing in for the FID Inception's release URL: the weights
    (`fid_weights`, the release file's names and shapes) and a small state dict of other names."""
    (tmp_path / "www").mkdir()
    os.symlink(fid_weights[0], tmp_path / "www" / "weights.pth")
    torch.save({"fc.weight": torch.ones(3, 2), "fc.bias": torch.zeros(3)}, tmp_path / "www" / "other.pth")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", tmp_path / "www"
    server.shutdown()


def test_the_fid_inception_weights_reach_the_store_verified(served, tmp_path):
    url, www = served
    uri = str(tmp_path / "store" / "fid")
    with pytest.raises(store.StoreError, match="is not the pinned"):
        fid_store.put_fid_inception(uri, tmp_path / "dl", url=f"{url}/weights.pth", expected_sha256="0" * 64)
    assert not store.is_complete(uri)
    # The pinned sha256 of a file that is not the network's state dict: refused before any worker loads it.
    other = hashlib.sha256((www / "other.pth").read_bytes()).hexdigest()
    with pytest.raises(store.StoreError, match="not torch-fidelity's inception-v3-compat state dict"):
        fid_store.put_fid_inception(uri, tmp_path / "dl", url=f"{url}/other.pth", expected_sha256=other)
    assert not store.is_complete(uri)
    content = (www / "weights.pth").read_bytes()
    entry = fid_store.put_fid_inception(uri, tmp_path / "dl", url=f"{url}/weights.pth",
                                        expected_sha256=hashlib.sha256(content).hexdigest())
    assert not entry["reused"] and weights(uri) == ["model.safetensors"]
    assert json.loads((Path(uri) / "config.json").read_text()) == {**fid_store.STANDARD_INCEPTION,
                                                                    "weights": f"{url}/weights.pth"}
    with safe_open(f"{uri}/model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("fc.bias"), torch.load(www / "weights.pth", weights_only=True)["fc.bias"])


def test_workers_load_hub_checkpoints_from_the_store_only(tmp_path):
    cfg = load_config(overrides=["models.preset=paper", f"run_dir={tmp_path}"])
    from blipinpaint import builders

    preset = builders.resolve_preset(cfg)
    for role in ("captioner", "inpainter", "clip", "fid"):
        assert getattr(preset, role).name_or_path.startswith(f"{tmp_path}/models/"), role
    assert builders.stored_refs(cfg).keys() == {"captioner", "inpainter", "clip", "fid"}
    cfg = load_config(overrides=[f"run_dir={tmp_path}", "models.store=/elsewhere"])  # the tiny preset
    assert builders.stored_refs(cfg) == {} and builders.resolve_preset(cfg).captioner.name_or_path.endswith("captioner")


# What public records show of each pinned revision, read again from the records themselves (a public
# code search, 2026-12) and written here with where each was read: for BLIP the manifest its listing
# also cites, for SD and CLIP records their listings do not cite. The listings (tests/data/hub/<repo>/
# listing.json, sources under `read_from`) are the whole record of each revision's tree; these facts
# are partial and must agree with them. Known values of a file: its byte size and sha256 there.
HUB_FACTS = {
    "captioner": {
        "source": "kurtvalcorza/blip-captioning-pipeline @849c17f: weights/blip-image-captioning-base/"
                  "dimer-base-manifest.json, a manifest of a snapshot of this revision (path, bytes, sha256 of "
                  "each file it loads), and src/blip_captioning_pipeline/pipeline.py: 'Upstream ships no "
                  "SafeTensors at this revision: the PyTorch weights are pytorch_model.bin (a pickle)'",
        "present": {
            "config.json": {"size": 4563,
                            "sha256": "f7846f82f4e2c4a2ccbab9ae8b0e44873540a271a76a1288effd078180c13a82"},
            "preprocessor_config.json": {"size": 287,
                                         "sha256": "065c10ec97edc5081fbd9655b3d9d25e2647ea6d5dab873325e88eed12d80a7d"},
            "special_tokens_map.json": {"size": 125,
                                        "sha256": "b6d346be366a7d1d48332dbc9fdf3bf8960b5d879522b7799ddba59e76237ee3"},
            "tokenizer.json": {"size": 711396,
                               "sha256": "d241a60d5e8f04cc1b2b3e9ef7a4921b27bf526d9f6050ab90f9267a1f9e5c66"},
            "tokenizer_config.json": {"size": 506,
                                      "sha256": "5c7f96096284c55e539eff95f4451c19efc34258ddb975a4400d052b77301e5e"},
            "vocab.txt": {"size": 231508, "sha256": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"},
            "pytorch_model.bin": {"size": 989820849,
                                  "sha256": "d6638651a5526cc2ede56f2b5104d6851b0755816d220e5e046870430180c767"},
        },
        "absent": ["model.safetensors"],
    },
    "inpainter": {
        "source": "public code pinning this revision: a setup script's snapshot_download(revision=8a4288a7..., "
                  "allow_patterns=[..., 'text_encoder/model.fp16.safetensors', 'unet/diffusion_pytorch_model.fp16."
                  "safetensors', 'vae/diffusion_pytorch_model.fp16.safetensors']); hub links at this revision to "
                  "unet/config.json and unet/diffusion_pytorch_model.fp16.safetensors; a model-provenance table "
                  "(sd-v1-5-inpainting.ckpt: 4,265,437,280 bytes, its LFS sha256); a transfer log (unet/"
                  "diffusion_pytorch_model.bin: 3,438,412,325 bytes); diffusers on a snapshot of this revision: 'no "
                  "file named diffusion_pytorch_model.safetensors found in directory .../8a4288a7.../vae'. The "
                  "team's notes (TRAPS.md, 'The real checkpoints', 'A real hub cache'): no fp32 safetensors in "
                  "unet/, vae/, text_encoder/; no tokenizer/tokenizer.json",
        "present": {
            "text_encoder/model.fp16.safetensors": {},
            "unet/diffusion_pytorch_model.fp16.safetensors": {},
            "vae/diffusion_pytorch_model.fp16.safetensors": {},
            "unet/config.json": {},
            "unet/diffusion_pytorch_model.bin": {"size": 3438412325},
            "sd-v1-5-inpainting.ckpt": {"size": 4265437280,
                                        "sha256": "c6bbc15e3224e6973459ba78de4998b80b50112b0ae5b5c67113d56b4e366b19"},
        },
        "absent": ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                   "vae/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json"],
    },
    "clip": {
        "source": "public code loading files from a hub cache's models--openai--clip-vit-large-patch14/snapshots/"
                  "32bd6428.../ (model.safetensors, tokenizer.json) and a hub link to blob/32bd6428.../tokenizer.json; "
                  "the team's notes (TRAPS.md, 'A real hub cache'): all three repos ship special_tokens_map.json",
        "present": {"model.safetensors": {}, "tokenizer.json": {}, "special_tokens_map.json": {}},
        "absent": [],
    },
}


@pytest.mark.parametrize("role", ["captioner", "inpainter", "clip"])
def test_the_preset_names_files_its_pinned_revision_holds(role):
    """Every file the preset asks for exists at its pinned revision on the hub, and no pickle is
    taken where safetensors exist beside it.

    The hub is out of reach here. Its record is each revision's listing (tests/data/hub, read from
    the sources its `read_from` names), held to the facts other public records give (HUB_FACTS);
    the weights the preset takes must be in both. Not the rehearsal cache: it is built from the
    listings, so it would agree with them whatever they say.
    """
    ref, facts = getattr(PAPER, role), HUB_FACTS[role]
    real = listing(ref.name_or_path.replace("/", "--"))
    assert (real["repo"], real["revision"]) == (ref.name_or_path, ref.revision)
    assert real["read_from"], f"{ref.name_or_path}: the listing names no source"
    # The listing agrees with the records read apart from it.
    for path, known in facts["present"].items():
        assert path in real["files"], (path, facts["source"])
        assert {key: real["files"][path][key] for key in known} == known, (path, facts["source"])
    for path in facts["absent"]:
        assert path not in real["files"], (path, facts["source"])
    # Every file the preset names is in the revision's listing; its weights in the other records too.
    for pattern in ref.files:
        assert [p for p in real["files"] if fnmatch.fnmatchcase(p, pattern)], (pattern, real["read_from"])
        if pattern.endswith(WEIGHT_SUFFIXES):
            assert pattern in facts["present"], (pattern, f"in no record of {ref.name_or_path} but its listing")
    for name in ref.files:
        if name.endswith(".bin"):
            folder = name.rpartition("/")[0]
            assert not [p for p in real["files"] if p.rpartition("/")[0] == folder and p.endswith(".safetensors")]


def test_a_store_folder_may_be_given_as_a_file_uri(stored):
    uri = "file://" + stored["clip"]["uri"]
    assert load_clip(ModelRef(uri), CPU).model.config.projection_dim == 32


@pytest.fixture
def bucket(s3):
    return s3("model-store")


def test_a_store_in_a_bucket_is_published_manifest_last_and_loads_on_a_node(paper_hub, bucket):
    uri = store.entry_uri(f"{bucket}/runs/r/models", PAPER.captioner)
    entry = store.put(PAPER.captioner, uri)
    assert not entry["reused"] and store.is_complete(uri) and store.manifest(uri)["files"] == entry["files"]
    assert store.put(PAPER.captioner, uri)["reused"]
    captioner = load_captioner(ModelRef(uri), CPU)  # copied once to this node's cache, then loaded
    assert captioner.model.config.text_config.bos_token_id == len(captioner.tokenizer)


def test_a_bucket_entry_without_its_content_manifest_is_redone_not_trusted(paper_hub, bucket):
    """A store entry in a bucket is complete only with both manifests: `_store.json` and the
    folder's content manifest that node copies are verified against (an entry cut between
    the two, or published before content manifests existed, is fetched again)."""
    uri = store.entry_uri(f"{bucket}/runs/cut/models", PAPER.captioner)
    store.put(PAPER.captioner, uri)
    fs, path = filesystem(f"{uri}/_manifest.json")
    fs.delete_file(path)
    assert not store.is_complete(uri)
    again = store.put(PAPER.captioner, uri)
    assert not again["reused"] and store.is_complete(uri)
    assert load_captioner(ModelRef(uri), CPU).model is not None
