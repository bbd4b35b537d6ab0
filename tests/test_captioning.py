import numpy as np
import pytest
import torch
from helpers import take

from blipinpaint.captioning import (
    Captioner,
    caption_features,
    caption_token_mask,
    edit_distance,
    encode_images,
    generate_captions,
)
from blipinpaint.masks import masked_pixels


def test_captions_and_features_shapes(captioner, sample_batch):
    out = captioner(sample_batch)
    n = len(sample_batch["id"])
    hidden = captioner.model.config.text_config.hidden_size
    assert out["caption"].shape == (n,) and all(isinstance(c, str) and c for c in out["caption"])
    assert out["caption_features"].shape == (n, hidden) and out["caption_features"].dtype == np.float32
    assert np.isfinite(out["caption_features"]).all()
    # The image steers the caption: different photographs, different captions.
    assert len(set(out["caption"])) == n


def test_captions_are_deterministic_and_batch_independent(captioner, sample_batch):
    first, second = captioner(sample_batch), captioner(sample_batch)
    assert list(first["caption"]) == list(second["caption"])
    assert np.array_equal(first["caption_features"], second["caption_features"])
    alone = captioner(take(sample_batch, [2]))
    assert alone["caption"][0] == first["caption"][2]
    assert np.allclose(alone["caption_features"][0], first["caption_features"][2], atol=1e-5)


def test_caption_never_sees_the_hidden_pixels(captioner, sample_batch):
    rng = np.random.default_rng(0)
    hole = sample_batch["mask"].astype(bool)
    changed_inside = dict(sample_batch, image=sample_batch["image"].copy())
    changed_inside["image"][hole] = rng.integers(0, 256, changed_inside["image"][hole].shape, dtype=np.uint8)
    base, inside = captioner(sample_batch), captioner(changed_inside)
    assert list(inside["caption"]) == list(base["caption"])
    assert np.array_equal(inside["caption_features"], base["caption_features"])
    # Control: the same change outside the hole does reach the captioner.
    changed_outside = dict(sample_batch, image=sample_batch["image"].copy())
    changed_outside["image"][~hole] = rng.integers(0, 256, changed_outside["image"][~hole].shape, dtype=np.uint8)
    assert not np.allclose(captioner(changed_outside)["caption_features"], base["caption_features"])


def _pixels(captioner, batch):
    visible = masked_pixels(batch["image"], batch["mask"])
    return captioner.bundle.image_processor(images=list(visible), return_tensors="pt").pixel_values


@torch.inference_mode()
def test_generation_matches_blips_own_generate(captioner, sample_batch):
    model, pixels = captioner.model, _pixels(captioner, sample_batch)
    ours = generate_captions(model, encode_images(model, pixels), max_new_tokens=12)
    theirs = model.generate(pixel_values=pixels, max_new_tokens=12)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("layer, index", [(-2, -2), (-1, -1), (1, 0)])
@torch.inference_mode()
def test_features_pool_the_configured_decoder_layer(captioner, sample_batch, layer, index):
    """Independent of `hidden_states` indexing: hook the layer's output directly. The default
    (`scorer.feature_layer=-2`) is the second-to-last layer."""
    model, pixels = captioner.model, _pixels(captioner, sample_batch)
    embeds = encode_images(model, pixels)
    ids = generate_captions(model, embeds, max_new_tokens=12)
    seen = {}
    layers = model.text_decoder.bert.encoder.layer
    def keep(module, args, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output

    handle = layers[index % len(layers)].register_forward_hook(keep)
    try:
        feats = caption_features(model, embeds, ids, layer=layer)
    finally:
        handle.remove()
    tokens = caption_token_mask(model, ids)
    assert not tokens[:, 0].any()  # [DEC] is not a caption token
    expected = torch.stack([seen["h"][i][tokens[i]].mean(dim=0) for i in range(len(ids))])
    assert torch.allclose(feats, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"scorer.feature_layer=-9: the text decoder has \d+ layers"):
        caption_features(model, embeds, ids, layer=-9)


def test_features_are_differentiable_in_the_decoder(captioner, sample_batch):
    model, pixels = captioner.model, _pixels(captioner, take(sample_batch, [0]))
    with torch.no_grad():
        embeds = encode_images(model, pixels)
        ids = generate_captions(model, embeds, max_new_tokens=8)
    feats = caption_features(model, embeds, ids)
    feats.sum().backward()
    grads = [p.grad for p in model.text_decoder.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_output_renames_the_caption_columns(captioner, sample_batch):
    renamed = Captioner(captioner.bundle, output="caption_finetuned")(sample_batch)
    original = captioner(sample_batch)
    assert list(renamed["caption_finetuned"]) == list(original["caption"]) and "caption" not in renamed
    assert np.allclose(renamed["caption_finetuned_features"], original["caption_features"])


def test_caption_settings_come_from_the_config(cfg, captioner, sample_batch):
    """`caption.max_new_tokens` caps the caption; `caption.num_beams` > 1 runs beam search,
    which finds another caption than greedy decoding for some photograph; `scorer.feature_layer`
    picks the features' layer."""
    from dataclasses import replace

    from blipinpaint import builders

    greedy = captioner(sample_batch)["caption"]
    short = builders.build_captioner(replace(cfg, caption=replace(cfg.caption, max_new_tokens=3)))(sample_batch)
    # Greedy decoding cut after 3 tokens: the start of each full caption, and shorter.
    assert all(g.startswith(c) and len(c) < len(g) for c, g in zip(short["caption"], greedy)), short["caption"]
    beams = builders.build_captioner(replace(cfg, caption=replace(cfg.caption, num_beams=4)))(sample_batch)["caption"]
    assert list(beams) != list(greedy)
    # `scorer.feature_layer` picks the layer the stage's features pool.
    last = builders.build_captioner(replace(cfg, scorer=replace(cfg.scorer, feature_layer=-1)))(sample_batch)
    model, pixels = captioner.model, _pixels(captioner, sample_batch)
    with torch.inference_mode():
        embeds = encode_images(model, pixels)
        expected = caption_features(model, embeds, generate_captions(model, embeds, max_new_tokens=30), layer=-1)
    assert np.allclose(last["caption_features"], expected.numpy(), atol=1e-5)
    assert not np.allclose(last["caption_features"], captioner(sample_batch)["caption_features"])


def test_the_decoder_runs_at_its_own_precision_beside_a_half_precision_encoder(cfg, captioner, sample_batch):
    """`models.dtype=bf16` casts the vision encoder; the text decoder keeps `caption.decoder_dtype`
    (fp32 unless set), its weights the checkpoint's own, not a round trip through bf16."""
    from dataclasses import replace

    from blipinpaint import builders

    half = replace(cfg, models=replace(cfg.models, dtype="bf16"))
    mixed = builders.build_captioner(half)
    assert {p.dtype for p in mixed.model.vision_model.parameters()} == {torch.bfloat16}
    fp32 = dict(captioner.model.text_decoder.named_parameters())
    assert all(torch.equal(p, fp32[k]) for k, p in mixed.model.text_decoder.named_parameters())
    out = mixed(sample_batch)
    assert out["caption_features"].dtype == np.float32 and all(out["caption"])
    both = builders.build_captioner(replace(half, caption=replace(half.caption, decoder_dtype="bf16")))
    assert {p.dtype for p in both.model.text_decoder.parameters()} == {torch.bfloat16}
    assert not np.array_equal(both(sample_batch)["caption_features"], out["caption_features"])


def test_edit_distance_counts_token_insertions_deletions_and_substitutions():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance([], [4, 5]) == 2
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance([7, 8], [8, 7]) == 2
