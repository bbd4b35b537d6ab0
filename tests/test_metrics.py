import numpy as np
import pytest
import torch
from helpers import photo
from skimage.metrics import structural_similarity
from torchmetrics.multimodal import CLIPScore

from blipinpaint.metrics import ClipScorer, InpaintMetrics, ssim_psnr, to_unit_tensor


@pytest.fixture(scope="module")
def pair():
    """A photo-like target and a noisy copy with a box-shaped hole of larger error."""
    target = np.stack([np.asarray(photo(64, 64, seed=s)) for s in (0, 1)])
    rng = np.random.default_rng(3)
    preds = np.clip(target + rng.normal(0, 10, target.shape), 0, 255).astype(np.uint8)
    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[:, 16:40, 20:50] = True
    preds[masks] = rng.integers(0, 256, preds[masks].shape, dtype=np.uint8)
    return target, preds, masks


def test_psnr_matches_its_definition(pair):
    target, preds, masks = pair
    got = ssim_psnr(to_unit_tensor(preds, "cpu"), to_unit_tensor(target, "cpu"), torch.from_numpy(masks))
    t, p = target / 255.0, preds / 255.0
    for i in range(2):
        mse = np.mean((p[i] - t[i]) ** 2)
        hole_mse = np.mean((p[i][masks[i]] - t[i][masks[i]]) ** 2)
        assert got["psnr"][i].item() == pytest.approx(10 * np.log10(1 / mse), rel=1e-4)
        assert got["psnr_hole"][i].item() == pytest.approx(10 * np.log10(1 / hole_mse), rel=1e-4)
    assert torch.all(got["psnr_hole"] < got["psnr"])  # the hole is where the error is


def test_ssim_matches_scikit_image(pair):
    target, preds, masks = pair
    got = ssim_psnr(to_unit_tensor(preds, "cpu"), to_unit_tensor(target, "cpu"), torch.from_numpy(masks))
    for i in range(2):
        # Wang et al.'s settings, which torchmetrics uses: 11x11 Gaussian, sigma 1.5.
        score, full = structural_similarity(
            target[i] / 255.0, preds[i] / 255.0, data_range=1.0, channel_axis=-1,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True,
        )
        # The hole lies 5+ pixels inside the image, where both libraries agree exactly.
        assert got["ssim_hole"][i].item() == pytest.approx(full[masks[i]].mean(), abs=1e-5)
        # Whole image: torchmetrics also averages the reflect-padded 5-pixel border that
        # scikit-image crops, a large share of a 64x64 image.
        assert got["ssim"][i].item() == pytest.approx(score, abs=0.1)
    assert torch.all(got["ssim_hole"] < got["ssim"])


def test_identical_images_score_perfectly(pair):
    target, _, masks = pair
    t = to_unit_tensor(target, "cpu")
    got = ssim_psnr(t, t, torch.from_numpy(masks))
    assert torch.allclose(got["ssim"], torch.ones(2)) and torch.allclose(got["ssim_hole"], torch.ones(2))
    assert torch.isinf(got["psnr"]).all()


def test_clip_score_is_clamped_scaled_cosine():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 1.0], [3.0, 0.0], [-1.0, 0.2]])
    assert torch.allclose(ClipScorer.score(image, text), torch.tensor([100 / 2**0.5, 100.0, 0.0]))


class _TensorFeatures(torch.nn.Module):
    """transformers 5 returns output objects from CLIP's feature getters; torchmetrics wants tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


class _Processor:
    def __init__(self, clip):
        self.clip = clip

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True):
        if images is not None:
            return self.clip.image_processor(images=[i.permute(1, 2, 0).numpy() for i in images], return_tensors="pt")
        return self.clip.tokenizer(text, return_tensors="pt", padding=True)


def test_clip_score_agrees_with_torchmetrics(metrics, sample_batch):
    """Per-sample scores equal torchmetrics' CLIPScore on the same model (which averages)."""
    clip = metrics.clip.clip
    scorer = ClipScorer(clip)
    captions = ["a cat on a street", "a rocket in the sky", "coffee cup", "coins"]
    images = sample_batch["image"]
    ours = scorer.score(scorer.image_embeddings(images), scorer.text_embeddings(captions))
    assert (ours > 0).any()  # random weights: some pairs still score above the clamp
    reference = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(clip.model), _Processor(clip)))
    for i, caption in enumerate(captions):
        reference.reset()
        reference.update(torch.from_numpy(images[i]).permute(2, 0, 1), caption)
        expected = max(reference.compute().item(), 0.0)
        assert ours[i].item() == pytest.approx(expected, abs=1e-3)


def test_metrics_stage_scores_both_variants_against_one_caption(metrics, sample_batch):
    batch = dict(sample_batch, caption=np.array(["a photo"] * 4, dtype=object),
                 inpainted=sample_batch["image"], inpainted_baseline=sample_batch["image"][::-1].copy())
    out = metrics(batch)
    for name in ("ssim", "psnr", "ssim_hole", "psnr_hole", "clip_score"):
        for suffix in ("", "_baseline"):
            assert out[name + suffix].shape == (4,) and out[name + suffix].dtype == np.float32
    assert np.allclose(out["ssim"], 1.0) and np.isinf(out["psnr"]).all()  # guided == ground truth here
    assert np.all(out["ssim_baseline"] < 1.0)
    assert np.all(out["clip_score"] >= 0)


def test_each_variant_is_scored_against_its_own_caption(metrics, sample_batch):
    """The evaluate step's variants: CLIP score against the caption column that guided each."""
    batch = dict(sample_batch, caption=np.array(["a photo"] * 4, dtype=object),
                 caption_finetuned=np.array(["a cat", "a rocket", "a cup", "coins"], dtype=object),
                 inpainted_finetuned=sample_batch["image"][::-1].copy())
    stage = InpaintMetrics(metrics.clip.clip, variants={"_finetuned": ("inpainted_finetuned", "caption_finetuned")})
    out = stage(batch)
    scorer = metrics.clip
    expected = scorer.score(scorer.image_embeddings(batch["inpainted_finetuned"]),
                            scorer.text_embeddings(list(batch["caption_finetuned"])))
    assert np.allclose(out["clip_score_finetuned"], expected.numpy(), atol=1e-4)
    assert "clip_score" not in out and out["ssim_finetuned"].shape == (4,)


def test_models_clip_points_the_metrics_at_another_folder(cfg, metrics, sample_batch, tmp_path):
    """`models.clip`: a CLIP folder of other weights (here the tiny one with its image projection
    negated) gives other CLIP scores for the same images and captions."""
    import shutil

    from safetensors.torch import load_file, save_file

    from blipinpaint import builders
    from blipinpaint.config import load_config

    tiny = builders.resolve_preset(cfg).clip.name_or_path
    other = tmp_path / "other-clip"
    shutil.copytree(tiny, other)
    weights = load_file(other / "model.safetensors")
    weights["visual_projection.weight"] = -weights["visual_projection.weight"]
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})

    batch = dict(sample_batch, caption=np.array(["a cat on a street", "a rocket", "a cup", "coins"], dtype=object),
                 inpainted=sample_batch["image"], inpainted_baseline=sample_batch["image"])
    ours = metrics(dict(batch))["clip_score"]
    theirs = builders.build_metrics(load_config(overrides=[f"run_dir={cfg.run_dir}",
                                                         f"models.clip.name_or_path={other}"]))(dict(batch))["clip_score"]
    assert (ours > 0).any() and (theirs > 0).any()
    assert not np.allclose(ours, theirs)  # cosines change sign: what scored above the clamp now does not


def test_the_metrics_stage_imports_torchmetrics_when_built_not_on_its_first_batch(metrics, model_cache):
    """The metrics actor pays torchmetrics' import (with scipy: seconds) while the pool's other
    actors start, not after the inpainter's first batch: built in a fresh process (as an actor
    is), the stage has imported it before any batch."""
    import os
    import subprocess
    import sys

    code = ("import sys; from blipinpaint import builders; from blipinpaint.config import load_config; "
            "builders.build_metrics(load_config()); print('torchmetrics.functional.image' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BLIPINPAINT_CACHE": str(model_cache)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True"
