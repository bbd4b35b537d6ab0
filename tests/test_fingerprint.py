"""Fingerprints: what each step's output depends on, the refusal to mix or reuse other
outputs, and `restart`, which moves an old output aside instead."""

import json
import uuid

import pytest

from blipinpaint import fingerprint, storage
from blipinpaint.config import load_config
from blipinpaint.errors import ConfigError
from blipinpaint.layout import Folder
from blipinpaint.storage import is_dir, is_file, read_text, write_text


def test_a_run_folder_refuses_rows_made_with_other_settings(tmp_path):
    cfg = load_config(overrides=[f"run_dir={tmp_path}"])
    fingerprint.check(str(tmp_path), fingerprint.generate(cfg))
    same = load_config(overrides=[f"run_dir={tmp_path}", "models.fid.name_or_path=/elsewhere", "evaluate.limit=4"])
    fingerprint.check(str(tmp_path), fingerprint.generate(same))  # FID and evaluation: rows unaffected
    other = load_config(overrides=[f"run_dir={tmp_path}", "seed=1", "masks.kind=thin", "scorer.feature_layer=-1"])
    with pytest.raises(ConfigError, match=r"masks.kind, scorer.feature_layer, seed differ"):
        fingerprint.check(str(tmp_path), fingerprint.generate(other))
    policy = load_config(overrides=[f"run_dir={tmp_path}", "inpaint.caption_max_mask_area=0.3"])
    with pytest.raises(ConfigError, match=r"inpaint.caption_max_mask_area differ"):
        fingerprint.check(str(tmp_path), fingerprint.generate(policy))
    # A compiled UNet rounds differently: its mode is recorded; eager is recorded as nothing (as
    # before the setting existed).
    assert "inpaint.compile" not in fingerprint.generate(cfg)
    compiled = load_config(overrides=[f"run_dir={tmp_path}", "inpaint.compile=default"])
    with pytest.raises(ConfigError, match=r"inpaint.compile differ"):
        fingerprint.check(str(tmp_path), fingerprint.generate(compiled))
    # Caption candidates change evaluate's and the candidate stream's rows only.
    candidates = load_config(overrides=[f"run_dir={tmp_path}", "caption.candidates=4"])
    fingerprint.check(str(tmp_path), fingerprint.generate(candidates))
    assert fingerprint.candidates(cfg) == {**fingerprint.generate(cfg), "caption.candidates": None}
    assert fingerprint.candidates(candidates)["caption.candidates"] == 4
    # A folder made with candidates refuses a run without them, and the other way round.
    with_candidates = tmp_path / "with-candidates"
    fingerprint.check(str(with_candidates), fingerprint.candidates(candidates))
    with pytest.raises(ConfigError, match=r"caption.candidates differ"):
        fingerprint.check(str(with_candidates), fingerprint.candidates(cfg))


def test_the_decoders_precision_is_in_every_fingerprint_of_a_caption(tmp_path):
    """`caption.decoder_dtype` changes generate's captions (so candidates' and evaluate's rows)
    and the fine-tune's probe captions and report: their fingerprints hold it."""
    cfg = load_config(overrides=[f"run_dir={tmp_path}"])
    half = load_config(overrides=[f"run_dir={tmp_path}", "caption.decoder_dtype=bf16"])
    for step in (fingerprint.generate, fingerprint.candidates, fingerprint.evaluate, fingerprint.finetune):
        assert fingerprint.differing(step(cfg), step(half)) == ["caption.decoder_dtype"], step.__name__
    assert fingerprint.generate(cfg)["caption.decoder_dtype"] == "fp32"


def test_generate_records_the_bytes_of_its_models_not_their_names(tmp_path):
    """Another checkpoint in the same folder is another model (finding 9): the fingerprint
    holds each model's content digest, so rows of the two never mix."""
    import shutil

    from blipinpaint import builders

    folder = tmp_path / "captioner"
    shutil.copytree(builders.resolve_preset(load_config()).captioner.name_or_path, folder)
    cfg = load_config(overrides=[f"run_dir={tmp_path}", f"models.captioner.name_or_path={folder}"])
    fingerprint.check(str(tmp_path), fingerprint.generate(cfg))
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("\n", "\n "))  # other bytes
    with pytest.raises(ConfigError, match=r"model_digests differ"):
        fingerprint.check(str(tmp_path), fingerprint.generate(cfg))


def test_a_models_folder_is_hashed_once_per_process_until_its_files_change(tmp_path, monkeypatch):
    """A pipeline's driver asks for the models' digests once per job and check: a settled local
    folder is hashed the first time only, and again once one of its files is rewritten; a
    folder written within `RACY_S` (its files could change again unseen in the same clock
    tick) is hashed every time."""
    import shutil

    from blipinpaint import builders

    folder = tmp_path / "captioner"
    shutil.copytree(builders.resolve_preset(load_config()).captioner.name_or_path, folder)
    cfg = load_config(overrides=[f"run_dir={tmp_path}", f"models.captioner.name_or_path={folder}"])
    hashed = []
    monkeypatch.setattr(builders, "folder_digest", lambda uri: hashed.append(uri) or storage.folder_digest(uri))
    monkeypatch.setattr(builders, "RACY_S", 3600.0)  # every file just written: never kept
    first = builders.model_digests(cfg, ("captioner",))
    assert builders.model_digests(cfg, ("captioner",)) == first and len(hashed) == 2
    monkeypatch.setattr(builders, "RACY_S", -3600.0)  # every file settled: kept
    assert builders.model_digests(cfg, ("captioner",)) == first and len(hashed) == 3
    assert builders.model_digests(cfg, ("captioner",)) == first and len(hashed) == 3
    config = folder / "config.json"
    config.write_text(config.read_text() + " ")  # other bytes, the same JSON
    assert builders.model_digests(cfg, ("captioner",)) != first and len(hashed) == 4


def _claim(cfg, step, folder, current):
    return fingerprint.claim(cfg, step, (Folder(folder),), current)


@pytest.fixture(params=["disk", "bucket"])
def run_root(request, tmp_path):
    if request.param == "disk":
        return str(tmp_path)
    return request.getfixturevalue("s3")(f"fp-{uuid.uuid4().hex[:12]}") + "/run"


def test_a_step_refuses_another_fingerprint_and_restart_moves_the_old_output_aside(run_root):
    folder = f"{run_root}/scorer"
    cfg = load_config(overrides=[f"run_dir={run_root}"])
    first = {"scorer.lr": 1e-4, "generate": {"rows": "a"}}
    assert _claim(cfg, "scorer", folder, first) == []
    write_text(f"{folder}/model/weights", "first training")
    assert _claim(cfg, "scorer", folder, first) == []  # the same: resumed as it is
    assert read_text(f"{folder}/model/weights") == "first training"
    second = {"scorer.lr": 1e-3, "generate": {"rows": "a"}}
    with pytest.raises(ConfigError, match=r"\(scorer.lr differ\): restart=\[scorer\] moves it aside"):
        _claim(cfg, "scorer", folder, second)
    restart = load_config(overrides=[f"run_dir={run_root}", "restart=[scorer]"])
    (moved,) = _claim(restart, "scorer", folder, second)
    assert moved.startswith(f"{folder}.replaced-") and read_text(f"{moved}/model/weights") == "first training"
    assert json.loads(read_text(f"{moved}/fingerprint.json")) == first  # kept whole, never deleted
    assert json.loads(read_text(f"{folder}/fingerprint.json")) == second and not is_file(f"{folder}/model/weights")
    assert not is_dir(f"{folder}/model")


def test_restart_reaches_the_steps_that_read_the_restarted_one(tmp_path):
    cfg = load_config(overrides=[f"run_dir={tmp_path}", "restart=[scorer]"])
    assert [s for s in fingerprint.STEPS if fingerprint.restarting(cfg, s)] == ["scorer", "finetune", "eval"]
    cfg = load_config(overrides=[f"run_dir={tmp_path}", "restart=[generate]"])
    assert all(fingerprint.restarting(cfg, s) for s in fingerprint.STEPS)
    with pytest.raises(ConfigError, match=r"restart=\['scorr'\]: 'scorr' is not a step"):
        load_config(overrides=[f"run_dir={tmp_path}", "restart=[scorr]"])


def test_output_of_unknown_origin_is_not_adopted(tmp_path):
    """A folder holding output but no fingerprint (written before fingerprints, or by hand)."""
    write_text(f"{tmp_path}/finetune/metrics.jsonl", "{}\n")
    cfg = load_config(overrides=[f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"holds the finetune step's output of other settings or inputs"):
        fingerprint.claim(cfg, "finetune", (Folder(f"{tmp_path}/finetune"), Folder(f"{tmp_path}/blip")), {"a": 1})
    cfg = load_config(overrides=[f"run_dir={tmp_path}", "restart=[finetune]"])
    moved = fingerprint.claim(cfg, "finetune", (Folder(f"{tmp_path}/finetune"), Folder(f"{tmp_path}/blip")),
                              {"a": 1})
    assert len(moved) == 1 and is_file(f"{moved[0]}/metrics.jsonl")  # blip/ did not exist: nothing to move


def test_a_step_is_done_only_with_its_fingerprint_in_success(tmp_path):
    folder = Folder(f"{tmp_path}/scorer")
    assert not fingerprint.done(folder, {"a": 1})
    write_text(folder.success, "")  # a marker that says nothing of what made it
    assert not fingerprint.done(folder, {"a": 1})
    fingerprint.finish(folder, {"a": 1})
    assert fingerprint.done(folder, {"a": 1}) and not fingerprint.done(folder, {"a": 2})


def test_a_run_that_starts_takes_the_done_marker_away_and_a_refused_one_does_not(tmp_path):
    """A finished step run again (more inputs, retried rows) is not done until it finishes
    again: a run cut short must not leave the old `_SUCCESS` for the next step to trust. A
    refused run writes nothing."""
    folder = Folder(f"{tmp_path}/generate")
    cfg = load_config(overrides=[f"run_dir={tmp_path}"])
    fingerprint.claim(cfg, "generate", (folder,), {"a": 1})
    fingerprint.finish(folder, {"a": 1})
    with pytest.raises(ConfigError):
        fingerprint.claim(cfg, "generate", (folder,), {"a": 2})
    assert fingerprint.done(folder, {"a": 1})
    fingerprint.claim(cfg, "generate", (folder,), {"a": 1})
    assert not is_file(folder.success)
