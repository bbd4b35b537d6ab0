"""Fingerprints: the settings each step's rows depend on, and the refusal to mix them."""

import pytest

from blipinpaint import fingerprint
from blipinpaint.config import load_config
from blipinpaint.errors import ConfigError


def test_a_run_folder_refuses_rows_made_with_other_settings(tmp_path):
    cfg = load_config(overrides=[f"run_dir={tmp_path}"])
    fingerprint.check(str(tmp_path), fingerprint.generate(cfg))
    same = load_config(overrides=[f"run_dir={tmp_path}", "models.fid.name_or_path=/elsewhere", "evaluate.limit=4"])
    fingerprint.check(str(tmp_path), fingerprint.generate(same))  # FID and evaluation: rows unaffected
    other = load_config(overrides=[f"run_dir={tmp_path}", "seed=1", "masks.kind=thin", "scorer.feature_layer=-1"])
    with pytest.raises(ConfigError, match=r"masks, scorer.feature_layer, seed differ"):
        fingerprint.check(str(tmp_path), fingerprint.generate(other))
    # The large-mask policy changes rows: recorded when set, left out at its default.
    assert "caption_max_mask_area" not in fingerprint.generate(cfg)["inpaint"]
    policy = load_config(overrides=[f"run_dir={tmp_path}", "inpaint.caption_max_mask_area=0.3"])
    with pytest.raises(ConfigError, match=r"inpaint differ"):
        fingerprint.check(str(tmp_path), fingerprint.generate(policy))
    # Caption candidates change evaluate's and the candidate stream's rows only.
    candidates = load_config(overrides=[f"run_dir={tmp_path}", "caption.candidates=4"])
    fingerprint.check(str(tmp_path), fingerprint.generate(candidates))
    assert fingerprint.candidates(cfg) == {**fingerprint.generate(cfg), "caption.candidates": None}
    assert fingerprint.candidates(candidates)["caption.candidates"] == 4
    # A folder made with candidates refuses a run without them, and the other way round.
    fingerprint.check(str(tmp_path), fingerprint.candidates(cfg))
    with_candidates = tmp_path / "with-candidates"
    fingerprint.check(str(with_candidates), fingerprint.candidates(candidates))
    with pytest.raises(ConfigError, match=r"caption.candidates differ"):
        fingerprint.check(str(with_candidates), fingerprint.candidates(cfg))
