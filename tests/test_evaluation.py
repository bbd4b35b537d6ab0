import numpy as np
import pytest

from blipinpaint.evaluation import (
    ALL,
    REAL,
    VARIANTS,
    bucket_names,
    bucket_of,
    caption_effect,
    correlation,
    fid_intervals,
    fid_scopes,
    summarize,
    variants_in,
)
from blipinpaint.records import METRICS
from blipinpaint.report_tables import paired_table, table1


def test_mask_buckets_from_edges():
    assert bucket_names([0.1, 0.3]) == ["<10%", "10-30%", ">=30%"]
    assert bucket_of(np.array([0.05, 0.1, 0.2, 0.3, 0.9]), [0.1, 0.3]) == \
        ["<10%", "10-30%", "10-30%", ">=30%", ">=30%"]
    assert bucket_of(np.array([0.5]), []) == ["all"]


PAPER_VARIANTS = ("baseline", "blip", "finetuned")


def columns(n: int = 6, variants=PAPER_VARIANTS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {"mask_area": np.array([0.05, 0.05, 0.2, 0.2, 0.2, 0.5][:n], dtype=np.float32),
           "caption": np.array([f"caption {i}" for i in range(n)], dtype=object)}
    out["caption_finetuned"] = np.array([f"new {c}" if i in (2, 4) else c for i, c in enumerate(out["caption"])],
                                        dtype=object)
    if "reranked" in variants:
        out["caption_reranked"] = np.array([f"best {c}" if i in (1, 2) else c for i, c in enumerate(out["caption"])],
                                           dtype=object)
    for v in variants_in(variants).values():
        for m in METRICS:
            out[m + v.suffix] = rng.uniform(0, 30, n).astype(np.float32)
    return out


def fid(value: float) -> dict:
    return {k: {"all": value, "<10%": value, "10-30%": value, ">=30%": None} for k in VARIANTS}


def test_summary_overall_and_per_bucket():
    cols = columns()
    cols["psnr"][0] = np.inf  # a perfect hole: counted, left out of the mean
    summary = summarize(cols, fid(3.0), [0.1, 0.3])
    blip = summary["variants"]["blip"]
    assert blip["samples"] == 6 and blip["fid"] == 3.0
    assert blip["psnr"]["infinite"] == 1 and blip["psnr"]["mean"] == pytest.approx(cols["psnr"][1:].mean())
    assert blip["clip_score"]["std"] == pytest.approx(cols["clip_score"].std(ddof=1), rel=1e-5)
    buckets = summary["mask_buckets"]
    assert {b: blk["baseline"]["samples"] for b, blk in buckets.items()} == {"<10%": 2, "10-30%": 3, ">=30%": 1}
    mid = buckets["10-30%"]["finetuned"]["ssim"]["mean"]
    assert mid == pytest.approx(cols["ssim_finetuned"][2:5].mean())
    assert buckets[">=30%"]["blip"]["fid"] is None  # one image: no covariance
    assert buckets[">=30%"]["blip"]["clip_score"]["std"] is None


def test_paired_differences_have_intervals_overall_per_bucket_and_where_captions_changed():
    cols = columns()
    summary = summarize(cols, fid(3.0), [0.1, 0.3], (500, 0, 0.95))
    changed = summary["changed"]
    assert (changed["captions"], changed["of"], changed["share"]) == (2, 6, pytest.approx(2 / 6))
    assert changed["variants"]["finetuned"]["samples"] == 2
    assert changed["variants"]["finetuned"]["ssim"]["mean"] == pytest.approx(cols["ssim_finetuned"][[2, 4]].mean())
    iv = summary["intervals"]
    delta = iv[ALL]["blip_vs_baseline"]["clip_score"]
    assert delta["estimate"] == pytest.approx((cols["clip_score"] - cols["clip_score_baseline"]).mean())
    assert delta["low"] < delta["estimate"] < delta["high"] and delta["n"] == 6
    on_changed = iv["changed"]["finetuned_vs_blip"]["psnr"]
    assert on_changed["estimate"] == pytest.approx((cols["psnr_finetuned"] - cols["psnr"])[[2, 4]].mean())
    assert iv["mask_buckets"][">=30%"]["blip"]["ssim"]["low"] is None  # one sample: nothing to resample
    assert iv[ALL]["blip"]["ssim"]["estimate"] == pytest.approx(cols["ssim"].mean())
    table = paired_table(summary)
    assert "caption changed by fine-tuning | fine-tuned − BLIP | 2 |" in table
    assert table.count("mask area") == 6  # two differences in each of three buckets


def test_no_changed_caption_leaves_that_subset_empty():
    cols = columns()
    cols["caption_finetuned"] = cols["caption"].copy()
    summary = summarize(cols, fid(3.0), [0.1, 0.3], (100, 0, 0.95))
    assert summary["changed"]["captions"] == 0
    assert summary["intervals"]["changed"]["finetuned_vs_blip"]["clip_score"] is None
    assert "caption changed by fine-tuning | fine-tuned − BLIP | 0 | n/a | n/a | n/a |" in paired_table(summary)


def test_fid_intervals_are_paired_over_the_samples_of_every_variant():
    """Every draw takes every variant's FID on the same rows: a variant shifted by a constant
    from the ground truth has that FID in every draw (zero width), and so does the difference
    of two variants at constant shifts."""
    import torch

    real = torch.as_tensor(np.random.default_rng(3).normal(size=(50, 4)))
    features = {REAL: real, "baseline": real + 0.5, "blip": real + 0.25, "finetuned": real + 0.25}
    out = fid_intervals(features, replicates=100, seed=0, confidence=0.95)
    assert (out["baseline"]["estimate"], out["baseline"]["low"], out["baseline"]["high"]) == pytest.approx(
        (1.0, 1.0, 1.0), abs=1e-9)  # 4 x 0.5²
    assert (out["blip_vs_baseline"]["low"], out["blip_vs_baseline"]["high"]) == pytest.approx((-0.75, -0.75), abs=1e-9)
    assert out["finetuned_vs_blip"]["estimate"] == pytest.approx(0.0, abs=1e-9) and out["blip"]["n"] == 50
    noisy = {**features, "blip": torch.as_tensor(np.random.default_rng(4).normal(size=(50, 4)))}
    spread = fid_intervals(noisy, replicates=100, seed=0, confidence=0.95)["blip"]
    assert spread["high"] - spread["low"] > 0.01  # independent noise: FID varies from draw to draw
    summary = summarize(columns(), fid(3.0), [0.1, 0.3], (100, 0, 0.95), {ALL: out})
    assert summary["intervals"][ALL]["baseline"]["fid"] == out["baseline"]
    rows = table1({"MSCOCO": summary}).splitlines()[2:]
    assert rows[0].split("|")[3].strip() == "1.00 [1.00, 1.00]"  # the baseline's FID with its interval
    assert rows[3].split("|")[3].strip() == "-0.75 [-0.75, -0.75]"  # BLIP − baseline


def test_fid_is_taken_on_the_changed_samples_alone():
    """The changed scope's FIDs come from those samples' rows only, in the order of their ids
    (that of the metrics' draws); they land in the changed block, its intervals and the
    paired table. Fewer than 2 samples: no FID."""
    import torch

    from blipinpaint.fid import fid_draw

    rng = np.random.default_rng(5)
    ids = [f"s{k}" for k in (3, 0, 5, 1, 4, 2)]  # as the FID workers returned them
    real = torch.as_tensor(rng.normal(size=(6, 3)))
    features = {REAL: real, "baseline": real + 1.0, "blip": torch.as_tensor(rng.normal(size=(6, 3))),
                "finetuned": real + 0.5}
    changed = ["s4", "s2", "s0"]
    scopes = fid_scopes(ids, features, {ALL: ids, "changed": changed, "one": ["s1"]}, 50, 0, 0.95)
    assert scopes["one"] == {}
    rows = torch.as_tensor([ids.index(i) for i in sorted(changed)])
    expected = fid_draw({k: x[rows] for k, x in features.items()}, REAL)
    assert {k: scopes["changed"][k]["estimate"] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert scopes["changed"]["finetuned"]["n"] == 3 and scopes[ALL]["finetuned"]["n"] == 6
    assert scopes["changed"]["blip"]["estimate"] != pytest.approx(scopes[ALL]["blip"]["estimate"])
    summary = summarize(columns(), fid(3.0), [0.1, 0.3], (100, 0, 0.95), scopes)
    assert summary["changed"]["variants"]["blip"]["fid"] == pytest.approx(expected["blip"])
    assert summary["intervals"]["changed"]["finetuned_vs_blip"]["fid"] == scopes["changed"]["finetuned_vs_blip"]
    line = next(r for r in paired_table(summary).splitlines()
                if r.startswith("| caption changed by fine-tuning | fine-tuned"))
    assert line.split("|")[-2].strip().startswith(f"{expected['finetuned'] - expected['blip']:+.3g}")


def test_the_scorers_correlation_with_what_was_scored():
    predicted = np.array([1.0, 2.0, 3.0, 4.0])
    assert correlation(predicted, 2 * predicted + 1) == pytest.approx(1.0)
    assert correlation(predicted, -predicted) == pytest.approx(-1.0)
    assert correlation(predicted, np.array([2.0, 1.0, np.inf, 4.0])) == pytest.approx(
        np.corrcoef([1.0, 2.0, 4.0], [2.0, 1.0, 4.0])[0, 1])  # the infinite PSNR left out
    assert correlation(predicted[:2], predicted[:2]) is None  # under 3 samples
    assert correlation(predicted, np.full(4, 7.0)) is None  # nothing varies


def test_the_caption_effect_names_the_bucket_where_it_stops_helping():
    def summary(verdicts: dict[str, tuple]) -> dict:
        def iv(low, high):
            return {"estimate": (low + high) / 2, "low": low, "high": high, "n": 5}
        return {"intervals": {"mask_buckets": {b: {"blip_vs_baseline": {"ssim": iv(*s), "psnr": iv(*p)}}
                                               for b, (s, p) in verdicts.items()}}}

    helps, unclear, hurts = (0.1, 0.3), (-0.1, 0.2), (-0.3, -0.1)
    edges = [0.1, 0.3]
    out = caption_effect(summary({"<10%": (helps, helps), "10-30%": (unclear, helps), ">=30%": (unclear, hurts)}),
                         edges)
    assert out["buckets"][">=30%"] == {"ssim": "unclear", "psnr": "hurts"}
    assert (out["stops_helping_from"], out["caption_max_mask_area"]) == (">=30%", 0.3)
    out = caption_effect(summary({"<10%": (helps, helps), "10-30%": (unclear, unclear), ">=30%": (hurts, hurts)}),
                         edges)
    assert (out["stops_helping_from"], out["caption_max_mask_area"]) == ("10-30%", 0.1)
    everywhere = caption_effect(summary({"<10%": (unclear, helps), ">=30%": (helps, unclear)}), edges)
    assert everywhere["stops_helping_from"] is None  # up to the largest masks: no threshold
    nowhere = caption_effect(summary({"<10%": (unclear, unclear), ">=30%": (hurts, unclear)}), edges)
    assert nowhere["stops_helping_from"] is None and nowhere["caption_max_mask_area"] is None
