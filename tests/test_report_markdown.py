"""report.md's words and tables from a made-up evaluation."""

from test_evaluation import columns, fid

from blipinpaint.config import load_config
from blipinpaint.evaluation import caption_effect, summarize
from blipinpaint.report_markdown import fid_protocol, reranked_text, write_report


def test_the_report_states_the_fid_protocol():
    """Point 8: the standard FID resizes like TensorFlow 1.x, without antialiasing; the report says
    which protocol its numbers follow, and that the offline network's do not compare. The line
    follows the network loaded (`describe_fid_features`), not the config's name for it."""
    network = {"network": "inception-v3-compat", "num_features": 2048, "weights_sha256": "ab" * 32}
    standard = fid_protocol(load_config(), {**network, "standard": True, "evidence": "checked: the pinned 6726"})
    assert "TensorFlow 1.x's bilinear resize and no antialiasing" in standard and "299x299" in standard
    assert "checked: the pinned 6726" in standard and "sha256 abababab" in standard
    other = fid_protocol(load_config(overrides=["models.preset=paper"]),
                         {**network, "standard": False, "evidence": "converted from a file of sha256 0000"})
    assert other.startswith("Inception v3 pool3 (2048-d) with the standard FID resize")
    assert "converted from a file of sha256 0000" in other and "do not compare with published ones" in other
    offline = fid_protocol(load_config())  # the tiny preset's network, described from its folder
    assert "offline:tiny" in offline and "64-d" in offline and "do not compare with published ones" in offline


def report(**extra) -> dict:
    summary = summarize(columns(), fid(3.0), [0.1, 0.3], (100, 0, 0.95))
    summary["intervals"]["fid_replicates"] = 50
    summary["caption_effect"] = caption_effect(summary, [0.1, 0.3])
    summary["changed"]["scorer"] = {"samples": 0, "pearson_r": {}}
    precision = {"dtype": "fp32", "weights": 1000, "changed": 400, "survived": 400, "survived_share": 1.0}
    return {"dataset": "MSCOCO", "models": {"fid": "offline:tiny/fid"}, "fid_protocol": "a protocol", **summary,
            "decoder_precision": precision, **extra}


def test_report_md_holds_every_section_and_table1_a_column_group_per_dataset(tmp_path):
    cfg = load_config(overrides=[f"run_dir={tmp_path}"])
    tables = write_report(cfg, report(), {"VisualGenome": report(dataset="VisualGenome")}, str(tmp_path))
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# Evaluation: MSCOCO\n\n6 held-out samples of ")
    assert "FID features `offline:tiny/fid`" in markdown and "FID protocol: a protocol." in markdown
    assert "Fine-tuning changed the caption of 2 of 6 samples\n(33.3 %)" in markdown
    assert ("text decoders ran in fp32 (`caption.decoder_dtype`): 400 of the 400 decoder weights fine-tuning "
            "changed survive that cast (100.0 %;") in markdown
    assert "nothing to compare the scorer's predictions with" in markdown and "scorer_changed.png" not in markdown
    for heading, table in (("Table 1", "table1"), ("Paired differences per sample", "paired"),
                           ("By mask area", "buckets")):
        assert f"## {heading}\n\n{tables[table]}\n" in markdown
    assert "MSCOCO: CLIP score ↑" in tables["table1"] and "VisualGenome: CLIP score ↑" in tables["table1"]
    assert "| mask area | n | BLIP − baseline, ssim | BLIP − baseline, psnr |" in markdown


def test_the_reranked_caption_is_named_only_where_it_was_taken():
    assert reranked_text(report()) == ""
    words = reranked_text(report(reranked={"candidates": 4, "differs": 3, "of": 6, "share": 0.5}))
    assert "proposed 4 captions per sample (its greedy one and 3 sampled)" in words
    assert "on 3 of 6 samples (50.0 %)" in words and words.endswith("\n")
