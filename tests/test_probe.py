"""The fine-tuning probe set: which images, its records, and its captions from a tiny BLIP."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from blipinpaint.captioning import visible_embeddings
from blipinpaint.probe import Probe, best_share, probe_record, probe_set
from blipinpaint.scorer import ScoreNet, ScoreNetConfig


def test_the_probe_set_is_the_same_whatever_the_order_of_the_reads(cfg):
    cfg = replace(cfg, finetune=replace(cfg.finetune, probe_size=2))
    train = [{"path": "a.parquet", "ids": ["t1", "t2", "t3"]}, {"path": "b.parquet", "ids": ["t4", "t5"]}]
    val = [{"path": "c.parquet", "ids": ["v1", "v2", "v3"]}, {"path": "d.parquet", "ids": []}]
    chosen = probe_set(cfg, train, val)
    assert set(chosen) == {"path", "ids", "heldout"}
    picked = [i for ids in chosen["ids"] for i in ids]
    assert len(picked) == 4 and len(chosen["heldout"]) == 2
    assert set(chosen["heldout"]) <= {"v1", "v2", "v3"} and set(chosen["heldout"]) <= set(picked)
    assert all(ids for ids in chosen["ids"]) and len(chosen["path"]) == len(chosen["ids"])  # no read without ids
    shuffled = probe_set(cfg, [{**r, "ids": r["ids"][::-1]} for r in train[::-1]], val[::-1])
    assert sorted(i for ids in shuffled["ids"] for i in ids) == sorted(picked)
    assert shuffled["heldout"] == chosen["heldout"]


def test_a_probe_record_counts_against_the_captions_before_training():
    def tokenize(caption):
        return caption.split()

    before = ["a dog on grass", "a red car", "a tree"]
    now = ["a dog on sand", "a red car", "two trees here"]
    record = probe_record(1, 8, now, before, [False, False, True], tokenize, [0.5, 20.0, 25.0],
                          best=["a dog on sand", None, "a tree"])
    assert record == {"epoch": 1, "step": 8, "probe_changed": 2, "probe_changed_heldout": 1,
                      "probe_edit_distance": pytest.approx((1 + 0 + 3) / 3),
                      "probe_pred_ssim": 0.5, "probe_pred_psnr": 20.0, "probe_pred_clip": 25.0,
                      "best_caption_share": 0.5, "best_caption_images": 2, "probe_captions": now}
    # Without a scorer nothing is predicted; without candidates there is no best to compare with.
    assert not any(k.startswith(("probe_pred_", "best_")) for k in probe_record(-1, 0, before, before,
                                                                               [False] * 3, tokenize, []))


def test_the_best_caption_share_counts_only_images_with_a_best_candidate():
    assert best_share(["a", "b", "c"], ["a", None, "x"]) == {"best_caption_share": 0.5, "best_caption_images": 2}
    assert best_share(["a"], [None]) == {"best_caption_share": None, "best_caption_images": 0}


def test_the_probe_captions_as_the_captioner_stage_does(cfg, captioner, sample_batch):
    """Before any training, the probe's decoding gives the captioner stage's captions; the
    scorer's mean prediction comes with them, and the decoder is left in train mode."""
    bundle = copy.deepcopy(captioner.bundle)  # the probe switches the decoder to train mode
    with torch.no_grad():
        embeds = visible_embeddings(bundle, sample_batch["image"], sample_batch["mask"])
    ids = [str(i) for i in sample_batch["id"]]
    rows = {"id": np.array(ids, dtype=object), "caption": np.array(["generated"] * len(ids), dtype=object)}
    probe = Probe(rows, embeds, bundle.tokenizer, cfg, heldout=ids[:1], best={ids[1]: "a best caption"})
    assert probe.heldout == [True] + [False] * (len(ids) - 1)
    assert probe.best == [None, "a best caption"] + [None] * (len(ids) - 2)

    captions, predicted = probe.caption(bundle.model, bundle.model.text_decoder)
    assert captions == list(captioner(sample_batch)["caption"]) and predicted == []
    assert bundle.model.text_decoder.training
    scorer = ScoreNet(ScoreNetConfig(in_features=bundle.model.config.text_config.hidden_size, hidden=(4,)))
    again, predicted = probe.caption(bundle.model, bundle.model.text_decoder, scorer)
    assert again == captions and len(predicted) == 3 and all(np.isfinite(predicted))

    record = probe.record(-1, 0, captions, captions, predicted)
    assert record["probe_changed"] == 0 and record["best_caption_images"] == 1
    assert probe.rows(probe.generated, captions) == [
        {"id": i, "heldout": h, "caption": "generated", "fine_tuned": c}
        for i, h, c in zip(ids, probe.heldout, captions)]
