import pytest

from blipinpaint.config import dataset_name, heldout_fraction, load_config, parse_args, to_yaml
from blipinpaint.errors import ConfigError
from blipinpaint.seeds import heldout


def test_defaults_are_the_embedded_tiny_run():
    cfg = load_config()
    assert cfg.models.preset == "tiny" and cfg.models.device == "cpu" and cfg.models.dtype == "fp32"
    assert cfg.data.source is None  # the shipped sample images
    assert cfg.masks.kind == "box"
    assert cfg.scorer.feature_layer == -2  # the paper's second-to-last decoder layer


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 5\ndata:\n  limit: 10\nmasks:\n  kind: thin\n")
    cfg = load_config(path, ["data.limit=3", "inpaint.guidance_scale=5"])
    assert (cfg.seed, cfg.data.limit, cfg.masks.kind, cfg.inpaint.guidance_scale) == (5, 3, "thin", 5.0)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["data.limit=2", "models.captioner.name_or_path=/tmp"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["data.limt=3"], "limt"),
    (["data.limit=many"], "data.limit"),
    (["models.dtype=fp16"], "fp16 needs models.device=cuda"),
    (["models.preset=huge"], "models.preset='huge'"),
    (["masks.kind=blob"], "masks.kind='blob'"),
    (["data.source=/no/such/folder"], "/no/such/folder"),
    (["data.limit=0"], "data.limit=0"),
    (["data.image_size=100"], "data.image_size=100"),
    (["inpaint.guidance_scale=0.5"], "inpaint.guidance_scale"),
    (["models.device=tpu"], "models.device='tpu'"),
    (["seed"], "dotted.key=value"),
    (["data.kind=zip"], "data.kind='zip'"),
    (["stream.commit.num_cpus=0"], "stream.commit.num_cpus"),
    (["stream.inpainter.min_size=3", "stream.inpainter.max_size=2"], "stream.inpainter: an autoscaling pool"),
    (["stream.captioner.min_size=1"], "stream.captioner: an autoscaling pool"),
    (["stream.metrics.size=0"], "stream.metrics.size=0"),
    (["stream.inpainter.num_gpus=-1"], "stream.inpainter: num_cpus and num_gpus"),
    (["train.val_fraction=1.5"], "train.val_fraction=1.5"),
    (["evaluate.limit=1"], "evaluate.limit=1 must be at least 2"),
    (["evaluate.gallery_limit=-1"], "evaluate.gallery_limit=-1 must be 0"),
    (["inpaint.caption_max_mask_area=1.5"], "inpaint.caption_max_mask_area=1.5 must be a share of the image"),
    (["caption.candidates=0"], "caption.candidates=0 must be at least 1"),
    (["inpaint.compile=fast"], "inpaint.compile='fast' is not one of \\['off', 'default', "
                               "'max-autotune-no-cudagraphs'\\]"),
    (["inpaint.compile=true"], "inpaint.compile='True' is not one of"),
    (["finetune.method=rlhf"], "finetune.method='rlhf' is not one of \\['scorer', 'reward_ranked'\\]"),
    (["finetune.method=reward_ranked"], "finetune.method=reward_ranked ranks caption.candidates captions per image: "
                                        "set it to 2 or more"),
    (["evaluate.mask_buckets=[0.3,0.1]"], "mask_buckets=\\[0.3, 0.1\\] must be increasing"),
    (["evaluate.fid.size=0"], "evaluate.fid.size=0"),
    (["evaluate.fid.size=auto"], "evaluate.fid.size=auto: only the stream's model stages size themselves"),
    (["stream.inpainter.size=many"], "stream.inpainter.size=many must be at least 1, or auto"),
    (["train.num_workers=3"], "finetune.batch_size=8 is the batch per optimizer step over all train.num_workers=3: "
                              "it must be a multiple of them"),
    (["train.num_workers=3", "finetune.batch_size=9"], "scorer.batch_size=64 is the batch per optimizer step"),
    (["progress_s=0"], "progress_s=0.0 must be a positive number of seconds"),
])
def test_bad_config_names_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(overrides=overrides)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["masks.kind=blob", "data.limit=0"])
    assert "masks.kind" in str(err.value) and "data.limit" in str(err.value)


def test_unknown_key_in_file_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modles:\n  preset: tiny\n")
    with pytest.raises(ConfigError, match="modles"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_command_line_exits_with_the_message(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["models.dtype=fp16"])
    assert exit_.value.code == 2
    assert "fp16 needs models.device=cuda" in capsys.readouterr().err


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    """Ray workers run elsewhere: a relative run_dir must mean the same folder for them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    cfg = load_config(overrides=["run_dir=runs/x", "data.source=imgs", "models.captioner.name_or_path=imgs"])
    assert cfg.run_dir == str(tmp_path / "runs" / "x") and cfg.data.source == str(tmp_path / "imgs")
    assert cfg.models.captioner.name_or_path == str(tmp_path / "imgs")
    assert load_config(overrides=["run_dir=s3://bucket/run"]).run_dir == "s3://bucket/run"


def test_held_out_share_and_dataset_name(tmp_path):
    """The 6 shipped samples hold out half (the embedded default needs an evaluation set)."""
    default = load_config()
    assert heldout_fraction(default) == 0.5 and dataset_name(default) == "samples"
    other = load_config(overrides=[f"data.source={tmp_path}"])
    assert heldout_fraction(other) == 0.2 and dataset_name(other) == tmp_path.name
    named = load_config(overrides=[f"data.source={tmp_path}", "train.val_fraction=0.1", "data.name=MSCOCO"])
    assert heldout_fraction(named) == 0.1 and dataset_name(named) == "MSCOCO"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 15, 30, 200])
def test_a_small_dataset_still_holds_two_samples_out(n, tmp_path):
    """A plain 20 % hash split of 15 photographs often holds out fewer than the two samples
    R² and FID need; the raised split holds out two whenever two remain to train on, and
    only adds samples to the plain split."""
    cfg = load_config(overrides=[f"data.source={tmp_path}"])
    for seed in range(40):
        ids = [f"photo-{seed}-{k}" for k in range(n)]
        cfg.seed = seed
        plain = {i for i in ids if heldout(seed, i, heldout_fraction(cfg))}
        raised = {i for i in ids if heldout(seed, i, heldout_fraction(cfg, ids))}
        assert plain <= raised
        if len(plain) >= 2 or n < 4:
            assert raised == plain
        else:
            assert len(raised) == 2 and n - len(raised) >= 2
    # Somewhere in those 40 draws the plain split did hold out fewer than two of 15.
    assert any(sum(heldout(s, f"photo-{s}-{k}", 0.2) for k in range(15)) < 2 for s in range(40))


def test_bf16_runs_on_cpu_and_fp16_needs_cuda():
    assert load_config(overrides=["models.dtype=bf16"]).models.dtype == "bf16"  # the CPU's half precision
    assert load_config(overrides=["models.dtype=fp16", "models.device=cuda"]).models.dtype == "fp16"
    with pytest.raises(ConfigError, match="on CPU use bf16 or fp32"):
        load_config(overrides=["models.dtype=fp16"])


def test_the_decoder_precision_is_fp32_unless_set_and_fp16_only_on_cuda():
    assert load_config().caption.decoder_dtype == "fp32"
    assert load_config(overrides=["caption.decoder_dtype=bf16"]).caption.decoder_dtype == "bf16"
    assert load_config(overrides=["caption.decoder_dtype=fp16", "models.device=cuda"]).caption.decoder_dtype == "fp16"
    with pytest.raises(ConfigError, match=r"caption.decoder_dtype=fp16 needs models.device=cuda"):
        load_config(overrides=["caption.decoder_dtype=fp16"])
    with pytest.raises(ConfigError, match=r"caption.decoder_dtype='half' is not one of \['fp32', 'fp16', 'bf16'\]"):
        load_config(overrides=["caption.decoder_dtype=half"])


def test_reading_a_config_or_a_stream_job_imports_no_model_library():
    """Every Ray task and actor that unpickles a config or a stream's function imports these
    modules first: transformers, diffusers and torchmetrics (seconds each) load only where a
    model is built, loaded or scored."""
    import subprocess
    import sys

    code = ("import sys, blipinpaint.config, rayjobs.generate, rayjobs.evaluate; "
            "print(sorted(m for m in ('transformers', 'diffusers', 'torchmetrics') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_old_name_of_the_stream_section_still_works(tmp_path, caplog):
    """`generate` was the section's name (it sets the candidates' and evaluate's streams too):
    configs that use it keep working, with a notice, and setting both names is an error."""
    old = tmp_path / "old.yaml"
    old.write_text("generate:\n  rows_per_file: 7\n  inpainter: {batch_size: 3}\n")
    cfg = load_config(old, ["generate.batch_retries=5"])
    assert (cfg.stream.rows_per_file, cfg.stream.inpainter.batch_size, cfg.stream.batch_retries) == (7, 3, 5)
    assert "the config section `generate` is now `stream`" in caplog.text
    assert load_config(overrides=["stream.rows_per_file=9"]).stream.rows_per_file == 9
    with pytest.raises(ConfigError, match=r"both `generate` and `stream` are set in the overrides"):
        load_config(overrides=["generate.rows_per_file=5", "stream.batch_retries=1"])


def test_inpaint_compile_is_off_unless_set_and_yamls_off_means_off(tmp_path):
    assert load_config().inpaint.compile == "off"
    path = tmp_path / "c.yaml"
    path.write_text("inpaint:\n  compile: off\n")  # YAML reads it as false
    assert load_config(path).inpaint.compile == "off"
    assert load_config(overrides=["inpaint.compile=max-autotune-no-cudagraphs"]).inpaint.compile == \
        "max-autotune-no-cudagraphs"
