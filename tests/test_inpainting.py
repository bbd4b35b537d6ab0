import numpy as np
import pytest
from helpers import take

from blipinpaint.batches import Guarded
from blipinpaint.inpainting import Inpainter


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
    seeds = [int(s) for s in inpainted["noise_seed"]]
    guided_empty, _ = inpainter._run(captioned["image"], captioned["mask"], [""] * 3, seeds, guidance_scale=7.5)
    diff = np.abs(guided_empty.astype(int) - inpainted["inpainted_baseline"].astype(int))
    assert diff.max() <= 1


def test_a_variant_prompted_by_another_caption_column_matches_the_same_caption(inpainter, captioned, inpainted):
    """The evaluate step's fine-tuned variant: same noise, its own caption column."""
    finetuned = Inpainter(inpainter.pipe, inpainter.steps, inpainter.guidance_scale, inpainter.seed,
                          prompts={"inpainted_finetuned": "caption_finetuned"})
    batch = dict(captioned, caption_finetuned=captioned["caption"])
    out = finetuned(batch)
    assert set(out) - set(batch) == {"inpainted_finetuned", "noise_seed"} and not any(out["error"])
    assert np.array_equal(out["inpainted_finetuned"], inpainted["inpainted"])


class NanOnRow:
    """The tiny pipeline with one row's output NaN, as an fp16 overflow in the UNet or VAE gives."""

    def __init__(self, pipe, row: int):
        self.pipe, self.row = pipe, row

    def __call__(self, **kwargs):
        out = self.pipe(**kwargs)
        out.images[self.row] = np.nan
        return out


def test_a_nan_inpainting_becomes_an_error_row_not_a_black_image(inpainter, captioned):
    broken = Inpainter(NanOnRow(inpainter.pipe, 1), inpainter.steps, inpainter.guidance_scale, inpainter.seed)
    sunk = []
    out = Guarded("inpainter", broken, sunk.append)(captioned)
    assert out["id"].tolist() == [captioned["id"][0], captioned["id"][2]]  # the others go on
    assert len(sunk) == 1 and sunk[0]["id"].tolist() == [captioned["id"][1]]
    assert sunk[0]["error"][0] == "inpainting failed: the inpainted image has NaN or infinite values"
