import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from blipinpaint.models import (
    ModelRef,
    fid_store,
    get_preset,
    load_captioner,
    load_clip,
    load_fid_features,
    load_inpaint_pipeline,
    offline,
    store,
    torch_device,
    torch_dtype,
)
from blipinpaint.models.inception import InceptionFeatures
from blipinpaint.models.presets import PAPER

CPU = torch.device("cpu")


def test_tiny_preset_builds_offline_and_loads_like_a_checkpoint(tmp_path):
    preset = get_preset("tiny", tmp_path)  # the hub is disabled for the whole test session
    assert preset.image_size == 64
    captioner = load_captioner(preset.captioner, CPU)
    assert captioner.tokenizer.bos_token == "[DEC]"
    assert captioner.model.config.text_config.bos_token_id == captioner.tokenizer.bos_token_id
    assert len(captioner.tokenizer("a cat on a street").input_ids) == 7  # [CLS] + 5 words + [SEP]
    clip = load_clip(preset.clip, CPU)
    assert clip.tokenizer.model_max_length == 77
    pipe = load_inpaint_pipeline(preset.inpainter, CPU)
    assert pipe.unet.config.in_channels == 9 and pipe.safety_checker is None
    fid = load_fid_features(preset.fid, CPU)
    feats = fid(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert feats.shape == (2, fid.num_features)


def test_offline_builds_are_reproducible(tmp_path):
    first = offline.ensure_built("tiny", tmp_path / "a")
    second = offline.ensure_built("tiny", tmp_path / "b")
    for part in ("captioner/model.safetensors", "clip/model.safetensors", "fid/model.safetensors",
                 "inpainter/unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(first / part), load_file(second / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    # A second call finds the build instead of redoing it.
    assert offline.ensure_built("tiny", tmp_path / "a") == first


def test_fullsize_preset_has_the_paper_architectures(tmp_path):
    """Parameter counts of BLIP base, SD 1.5 inpainting and CLIP ViT-L/14 (built on `meta`, no memory)."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    blip_tok, clip_tok = offline.blip_tokenizer(tmp_path / "b"), offline.clip_tokenizer(tmp_path / "c")
    spec = offline.FULLSIZE
    with torch.device("meta"):
        blip = offline.make_captioner(spec, blip_tok)
        pipe = offline.make_inpainter(spec, clip_tok)
        clip = offline.make_clip(spec, clip_tok)
        fid = InceptionFeatures(spec.inception)
    assert count(pipe.unet) == 859_535_364  # SD 1.5's 859.52M UNet with 5 extra input channels
    assert count(pipe.vae) == 83_653_863
    assert count(pipe.text_encoder) == 123_060_480  # CLIP ViT-L/14 text tower
    assert count(clip) == 427_616_513  # CLIP ViT-L/14
    assert count(blip) == 223_971_644  # BLIP base captioner (LM head tied to the embeddings)
    assert fid.num_features == 2048 and spec.image_size == 512


def test_paper_preset_is_pinned():
    for ref in (PAPER.captioner, PAPER.inpainter, PAPER.clip):
        assert re.fullmatch(r"[0-9a-f]{40}", ref.revision), ref
    assert PAPER.image_size == 512


def test_workers_never_load_from_the_hub():
    with pytest.raises(ValueError, match="through the model store"):
        load_captioner(PAPER.captioner, CPU)


@pytest.mark.parametrize("revision", [None, "main", "v1.0", "82a37760"])
def test_the_store_fetches_pinned_commits_only(revision):
    ref = ModelRef(PAPER.captioner.name_or_path, revision, PAPER.captioner.files)
    with pytest.raises(store.StoreError, match="not a pinned commit"):
        store.fetch(ref)


def test_pickle_checkpoints_are_refused(tmp_path):
    preset = get_preset("tiny")
    captioner = load_captioner(preset.captioner, CPU)
    folder = tmp_path / "pickled"
    captioner.model.config.save_pretrained(folder)
    torch.save(captioner.model.state_dict(), folder / "pytorch_model.bin")  # the pickle format
    captioner.tokenizer.save_pretrained(folder)
    captioner.image_processor.save_pretrained(folder)
    with pytest.raises(OSError, match="safetensors"):
        load_captioner(ModelRef(str(folder)), CPU)


def test_device_and_dtype_are_explicit():
    assert torch_dtype("fp32", CPU) is torch.float32
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        torch_dtype("fp16", CPU)
    with pytest.raises(ValueError, match="models.dtype"):
        torch_dtype("fp8", CPU)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            torch_device("cuda")


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        get_preset("huge")


def test_the_fid_inception_loads_without_torch_fidelity_and_names_weights_it_cannot_take(tmp_path):
    """A folder whose config.json names the FID Inception loads our network (no torchvision,
    no torch-fidelity); weights of other names are refused naming the folder and what is wrong."""
    (tmp_path / "config.json").write_text(json.dumps(fid_store.STANDARD_INCEPTION))  # a store entry's
    save_file({"fc.bias": torch.zeros(1008)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{tmp_path}: not the FID Inception's weights: 471 missing weights"):
        load_fid_features(ModelRef(str(tmp_path)), CPU)