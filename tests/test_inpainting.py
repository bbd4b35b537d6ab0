import numpy as np
import pytest
import torch
from helpers import FUSED_TOLERANCE, take

from blipinpaint import builders
from blipinpaint.batches import Guarded
from blipinpaint.config import load_config
from blipinpaint.inpainting import Inpainter, denoise


@pytest.fixture(scope="module")
def captioned(captioner, sample_batch):
    return captioner(take(sample_batch, [0, 1, 2]))


@pytest.fixture(scope="module")
def inpainted(inpainter, captioned):
    return inpainter(captioned)


def test_outputs_are_images_that_keep_the_known_pixels(captioned, inpainted):
    hole = captioned["mask"].astype(bool)
    for column in ("inpainted", "inpainted_baseline"):
        out = inpainted[column]
        assert out.shape == captioned["image"].shape and out.dtype == np.uint8
        assert np.array_equal(out[~hole], captioned["image"][~hole])
        assert not np.array_equal(out[hole], captioned["image"][hole])
    assert inpainted["noise_seed"].dtype == np.int64 and len(set(inpainted["noise_seed"])) == 3


def test_same_seed_same_pixels_and_batch_does_not_matter(inpainter, captioned, inpainted):
    again = inpainter(captioned)
    assert np.array_equal(again["inpainted"], inpainted["inpainted"])
    alone = inpainter(take(captioned, [1]))
    diff = np.abs(alone["inpainted"][0].astype(int) - inpainted["inpainted"][1].astype(int))
    assert diff.max() <= 1  # float reductions may round differently at another batch size


def test_seed_changes_the_noise(inpainter, captioned, inpainted):
    other = Inpainter(inpainter.pipe, inpainter.steps, inpainter.guidance_scale, seed=inpainter.seed + 1)
    assert not np.array_equal(other(captioned)["inpainted"], inpainted["inpainted"])


def test_caption_changes_the_guided_output_only(inpainter, captioned, inpainted):
    recaptioned = dict(captioned, caption=np.array(["snow"] * 3, dtype=object))
    out = inpainter(recaptioned)
    assert not np.array_equal(out["inpainted"], inpainted["inpainted"])
    assert np.array_equal(out["inpainted_baseline"], inpainted["inpainted_baseline"])


def test_baseline_without_guidance_equals_guidance_on_an_empty_prompt(inpainter, captioned, inpainted):
    """Why the baseline skips classifier-free guidance: with no text it changes nothing."""
    guided_empty = Inpainter(inpainter.pipe, inpainter.steps, 7.5, inpainter.seed, prompts={"out": "empty"})(
        dict(captioned, empty=np.array([""] * 3, dtype=object)))["out"]
    diff = np.abs(guided_empty.astype(int) - inpainted["inpainted_baseline"].astype(int))
    assert diff.max() <= 1


def reference(pipe, batch, prompts, seeds, steps, guidance_scale) -> np.ndarray:
    """The diffusers pipeline called for one variant, as the generate job did before the fused loop."""
    height, width = batch["image"].shape[1:3]
    return pipe(prompt=prompts, image=batch["image"].astype(np.float32) / 255.0,
                mask_image=batch["mask"][..., None].astype(np.float32), height=height, width=width,
                num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np",
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images


@pytest.fixture(scope="module")
def bf16_pipe(cfg):
    return builders.build_inpainter(load_config(overrides=[f"run_dir={cfg.run_dir}", "models.dtype=bf16"])).pipe


@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_fused_loop_makes_the_pipelines_images_for_every_variant(inpainter, bf16_pipe, captioned, scheduler,
                                                                      dtype):
    """One loop over [empty, caption] rows of the guided variants and the baseline's empty rows
    makes, variant by variant, what the pipeline makes called once per variant: the preset's
    PNDM and a scheduler with another noise scale and input scaling (Euler), in float32 and
    in bf16 (what half precision runs as on CPU), within a rounding of each."""
    import diffusers

    pipe = inpainter.pipe if dtype == "fp32" else bf16_pipe
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
    try:
        seeds = [11, 22, 33]
        captions = [str(c) for c in captioned["caption"]]
        variants = {"guided": captions, "retold": captions[::-1], "baseline": None}
        fused = denoise(pipe, captioned["image"], captioned["mask"], variants, seeds, 3, 7.5)
        tolerance = FUSED_TOLERANCE[dtype]
        for column, prompts in variants.items():
            expected = reference(pipe, captioned, prompts or [""] * 3, seeds, 3, 1.0 if prompts is None else 7.5)
            assert fused[column].shape == expected.shape
            assert np.abs(fused[column] - expected).max() < tolerance, column
        assert np.abs(fused["guided"] - fused["baseline"]).max() > 0.1  # the captions do something
    finally:
        pipe.scheduler = original


def test_a_variant_prompted_by_another_caption_column_matches_the_same_caption(inpainter, captioned, inpainted):
    """The evaluate step's fine-tuned variant: same noise, its own caption column."""
    finetuned = Inpainter(inpainter.pipe, inpainter.steps, inpainter.guidance_scale, inpainter.seed,
                          prompts={"inpainted_finetuned": "caption_finetuned"})
    batch = dict(captioned, caption_finetuned=captioned["caption"])
    out = finetuned(batch)
    assert set(out) - set(batch) == {"inpainted_finetuned", "noise_seed"} and not any(out["error"])
    # The same pixels but where float sums round differently: its UNet batch has 2 rows per
    # image, the generate stage's 3.
    diff = np.abs(out["inpainted_finetuned"].astype(int) - inpainted["inpainted"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_a_nan_inpainting_becomes_an_error_row_not_a_black_image(inpainter, captioned, monkeypatch):
    """The VAE's output NaN on one row of the guided variant, as an fp16 overflow in the UNet
    or the VAE gives."""
    decode = inpainter.pipe.vae.decode

    def overflowing(latents, **kwargs):
        out = decode(latents, **kwargs)
        out[0][1] = float("nan")  # rows are variant-major: row 1 is the second sample's guided image
        return out

    monkeypatch.setattr(inpainter.pipe.vae, "decode", overflowing)
    sunk = []
    out = Guarded("inpainter", inpainter, sunk.append)(captioned)
    assert out["id"].tolist() == [captioned["id"][0], captioned["id"][2]]  # the others go on
    assert len(sunk) == 1 and sunk[0]["id"].tolist() == [captioned["id"][1]]
    assert sunk[0]["error"][0] == "inpainting failed: the inpainted image has NaN or infinite values"


def test_a_mask_over_caption_max_mask_area_is_inpainted_without_text(inpainter, captioned, inpainted):
    """`inpaint.caption_max_mask_area`: the sample whose mask hides more than the threshold
    gets an empty prompt (its guided image is the baseline's, up to rounding); the others
    keep their caption."""
    policy = Inpainter(inpainter.pipe, inpainter.steps, inpainter.guidance_scale, inpainter.seed,
                       caption_max_mask_area=0.3)
    out = policy(dict(captioned, mask_area=np.array([0.1, 0.5, 0.2], dtype=np.float32)))
    guided, baseline = (inpainted[c].astype(int) for c in ("inpainted", "inpainted_baseline"))
    assert np.abs(guided[1] - baseline[1]).max() > 10  # with its caption, it came out otherwise
    assert np.abs(out["inpainted"][1].astype(int) - baseline[1]).max() <= 1
    assert np.abs(out["inpainted"][[0, 2]].astype(int) - guided[[0, 2]]).max() <= 1
    assert np.array_equal(out["inpainted_baseline"], inpainted["inpainted_baseline"])
    assert list(out["caption"]) == list(captioned["caption"])  # the row still records BLIP's caption
