import subprocess
import sys

import numpy as np
import pytest

from blipinpaint.masks import MASK_KINDS, MaskGenerator, make_mask, masked_pixels
from blipinpaint.seeds import sample_rng, sample_seed

IDS = np.array([f"img{i:03d}.jpg" for i in range(40)], dtype=object)


def test_paper_box_is_200_pixels_square_at_512():
    out = MaskGenerator("box", 512, seed=0)({"id": IDS[:5]})
    for m in out["mask"]:
        rows, cols = np.nonzero(m)
        assert rows.max() - rows.min() + 1 == 200 and cols.max() - cols.min() + 1 == 200
        assert m.sum() == 200 * 200
    assert np.allclose(out["mask_area"], 200 * 200 / 512**2)
    # The box moves with the sample: not the same place for every image.
    assert len({tuple(np.argwhere(m)[0]) for m in out["mask"]}) > 1


def test_box_scales_with_image_size():
    m = MaskGenerator("box", 64, seed=0)({"id": IDS[:1]})["mask"][0]
    assert m.sum() == round(64 * 200 / 512) ** 2


def test_irregular_masks_grow_from_thin_to_thick():
    areas = {k: MaskGenerator(k, 256, seed=1)({"id": IDS})["mask_area"] for k in ("thin", "medium", "thick")}
    for kind, a in areas.items():
        assert np.all(a > 0) and np.all(a < 1), kind
    # LaMa's settings: thick strokes are wider and longer than medium ones.
    assert np.median(areas["medium"]) < np.median(areas["thick"])
    # Thin masks are many narrow strokes: less covered per stroke width than thick ones.
    assert np.median(areas["thin"]) < np.median(areas["thick"])


def test_masks_depend_only_on_seed_and_id():
    gen = MaskGenerator("mixed", 128, seed=7)
    alone = gen({"id": IDS[3:4]})
    batched = gen({"id": IDS[:8]})
    assert np.array_equal(alone["mask"][0], batched["mask"][3])
    assert alone["mask_kind"][0] == batched["mask_kind"][3]
    other_seed = MaskGenerator("mixed", 128, seed=8)({"id": IDS[:8]})
    assert not np.array_equal(other_seed["mask"], batched["mask"])
    assert len({m.tobytes() for m in batched["mask"]}) == 8  # every sample its own mask


def test_mixed_mode_draws_every_kind():
    kinds = set(MaskGenerator("mixed", 64, seed=0)({"id": IDS})["mask_kind"])
    assert kinds == set(MASK_KINDS)


def test_mask_area_is_the_hidden_fraction():
    out = MaskGenerator("medium", 64, seed=0)({"id": IDS[:6]})
    assert out["mask"].dtype == np.uint8 and set(np.unique(out["mask"])) <= {0, 1}
    assert np.allclose(out["mask_area"], out["mask"].reshape(6, -1).mean(axis=1))


def test_a_batch_whose_rows_all_failed_upstream_is_masked_as_empty():
    out = MaskGenerator("box", 64, seed=0)({"id": IDS[:0]})
    assert out["mask"].shape == (0, 64, 64) and out["mask_area"].shape == (0,)


def test_masked_pixels_hides_only_the_hole():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    masks = MaskGenerator("thick", 64, seed=0)({"id": IDS[:2]})["mask"]
    out = masked_pixels(images, masks)
    hole = masks.astype(bool)
    assert np.all(out[hole] == 127)
    assert np.array_equal(out[~hole], images[~hole])


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown mask mode 'blob'"):
        MaskGenerator("blob", 64, seed=0)
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask("blob", 64, sample_rng(0, "x", "mask"))


def test_seeds_are_stable_across_processes():
    # Python's str hash is salted per process; the seed must not be.
    code = "from blipinpaint.seeds import sample_seed; print(sample_seed(3, 'a/b.jpg', 'noise'))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": str(h)}, check=True).stdout.strip() for h in (1, 2)}
    assert runs == {str(sample_seed(3, "a/b.jpg", "noise"))}
    assert sample_seed(3, "a/b.jpg", "noise") != sample_seed(3, "a/b.jpg", "mask")
    assert 0 <= sample_seed(3, "a/b.jpg", "noise") < 2**63
