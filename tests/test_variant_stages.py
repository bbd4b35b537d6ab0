import numpy as np

from blipinpaint.io import encode_png
from blipinpaint.records import METRICS
from blipinpaint.variant_stages import Chain, OnlyChanged, reuse_inpainting, reuse_metrics


def test_an_unchanged_caption_reuses_the_blip_inpainting_and_metrics():
    """Only the rows whose fine-tuned caption changed reach the inpainter and the metrics; the
    others take the BLIP variant's image and scores, and the batch keeps its order."""
    seen = []

    def inpaint(rows):
        seen.append(list(rows["id"]))
        return {**rows, "inpainted_finetuned": np.full((len(rows["id"]), 4, 4, 3), 7, np.uint8)}

    def score(rows):
        seen.append(list(rows["id"]))
        return {**rows, **{m + "_finetuned": np.full(len(rows["id"]), 99.0, np.float32) for m in METRICS}}

    batch = {"id": np.array(list("abcd"), dtype=object), "caption": np.array(list("wxyz"), dtype=object),
             "caption_finetuned": np.array(["w", "X", "y", "Z"], dtype=object),
             "inpainted_png": np.array([encode_png(np.full((4, 4, 3), i, np.uint8)) for i in range(4)], dtype=object),
             **{m: np.arange(4, dtype=np.float32) for m in METRICS}}
    out = OnlyChanged(inpaint, reuse_inpainting)(batch)
    out = OnlyChanged(score, reuse_metrics)(out)
    assert seen == [["b", "d"], ["b", "d"]]
    assert list(out["id"]) == list("abcd") and list(out["caption_finetuned"]) == ["w", "X", "y", "Z"]
    assert [int(image[0, 0, 0]) for image in out["inpainted_finetuned"]] == [0, 7, 2, 7]
    assert list(out["ssim_finetuned"]) == [0.0, 99.0, 2.0, 99.0]
    seen.clear()
    unchanged = {**batch, "caption_finetuned": batch["caption"]}
    out = OnlyChanged(inpaint, reuse_inpainting)(unchanged)
    assert seen == [] and [int(image[0, 0, 0]) for image in out["inpainted_finetuned"]] == [0, 1, 2, 3]


def test_a_chain_runs_its_stages_in_order():
    chain = Chain([lambda b: {**b, "x": b["x"] + 1}, lambda b: {**b, "x": b["x"] * 10}])
    assert chain({"x": np.array([1, 2])})["x"].tolist() == [20, 30]
