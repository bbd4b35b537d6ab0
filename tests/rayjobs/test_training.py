"""The Ray Train + DeepSpeed plumbing both training jobs share."""

import pickle

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler, DynamicLossScaler

from blipinpaint import fingerprint
from blipinpaint.config import load_config
from blipinpaint.errors import ConfigError, JobError
from blipinpaint.reader import split_reads
from blipinpaint.seeds import heldout as heldout_of
from rayjobs import training


def fp16_optimizer_state() -> dict:
    """What DeepSpeed's ZeRO-1/2 optimizer puts in an fp16 checkpoint: its live loss scaler object
    (built here exactly as the engine builds it from its fp16 settings), beside tensors and numbers."""
    settings = DeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                                "fp16": {"enabled": True}}, mpu=None).float16_config
    scaler = CreateLossScaler(torch.float16, 0, True, settings.dynamic_loss_scale_args())
    scaler.cur_scale, scaler.cur_iter = 2048.0, 37  # a state a few overflows into training
    return {"optimizer_state_dict": {"loss_scaler": scaler, "dynamic_loss_scale": True, "overflow": False,
                                     "single_partition_of_fp32_groups": [torch.ones(4)]}}


def test_an_fp16_loss_scaler_checkpoint_restores_through_the_weights_only_engine(tmp_path):
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    TorchCheckpointEngine().save(fp16_optimizer_state(), str(path))  # as DeepSpeed saves it
    restored = training.WeightsOnlyCheckpointEngine().load(str(path))["optimizer_state_dict"]
    scaler = restored["loss_scaler"]
    assert isinstance(scaler, DynamicLossScaler) and (scaler.cur_scale, scaler.cur_iter) == (2048.0, 37)
    assert torch.equal(restored["single_partition_of_fp32_groups"][0], torch.ones(4))


def test_the_weights_only_engine_still_refuses_other_objects(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "bad.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": Payload()}}, path)
    with pytest.raises(pickle.UnpicklingError, match="print"):
        training.WeightsOnlyCheckpointEngine().load(str(path))


@pytest.mark.parametrize("dtype, bf16, fp16", [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)])
def test_deepspeed_trains_in_the_configured_precision_on_any_device(dtype, bf16, fp16):
    gpu = ["models.device=cuda", "train.use_gpu=true"] if dtype == "fp16" else []  # the config only: no CUDA used
    cfg = load_config(overrides=[f"models.dtype={dtype}", *gpu])
    ds = training.deepspeed_config(cfg, 8)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (bf16, fp16)
    assert training.half_dtype(cfg) == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    fp32 = training.deepspeed_config(cfg, 8, dtype="fp32")  # the scorer's MLP
    assert not fp32["bf16"]["enabled"] and not fp32["fp16"]["enabled"]


def _generated(run_dir, ids):
    from helpers import sample_rows

    from blipinpaint.commit_log import CommitLog

    CommitLog(f"{run_dir}/generate").commit(sample_rows(ids, [""] * len(ids)))


def test_fifteen_photographs_hold_two_out_in_every_job(tmp_path):
    """The reported crash: a 20 % hash split of 15 photographs held out fewer than two, and
    the scorer's R² failed after training. Every job now splits off the same two or more."""
    from blipinpaint.seeds import heldout
    from rayjobs import evaluate

    seed = next(s for s in range(100) if sum(heldout(s, f"p{k}", 0.2) for k in range(15)) < 2)
    ids = [f"p{k}" for k in range(15)]
    _generated(tmp_path, ids)
    cfg = load_config(overrides=[f"run_dir={tmp_path}", f"data.source={tmp_path}", f"seed={seed}"])
    train, val = split_reads(cfg)
    held = sorted(i for read in val for i in read["ids"])
    assert len(held) == 2 and sum(len(read["ids"]) for read in train) == 13
    assert evaluate.evaluation_ids(cfg) == held  # the evaluation set is the same held-out split


def test_a_split_that_leaves_nothing_to_train_on_is_a_config_error(tmp_path):
    seed = next(s for s in range(100) if heldout_of(s, "only", 0.2))
    _generated(tmp_path, ["only"])
    cfg = load_config(overrides=[f"run_dir={tmp_path}", f"data.source={tmp_path}", f"seed={seed}"])
    with pytest.raises(ConfigError, match=r"1 generated samples, 1 of them held out \(train.val_fraction"):
        split_reads(cfg)


def test_training_refuses_rows_whose_features_came_from_another_layer(tmp_path):
    """The scorer and the fine-tuning read the caption features generate stored: from the
    decoder layer the run was generated with, and no other."""
    _generated(tmp_path, [f"p{k}" for k in range(8)])
    cfg = load_config(overrides=[f"run_dir={tmp_path}", f"data.source={tmp_path}"])
    fingerprint.check(str(tmp_path / "generate"), fingerprint.generate(cfg))  # as generate records it
    assert split_reads(cfg)  # the same layer
    other = load_config(overrides=[f"run_dir={tmp_path}", f"data.source={tmp_path}", "scorer.feature_layer=-1"])
    with pytest.raises(ConfigError, match=r"holds rows generated with other settings \(scorer.feature_layer differ\)"):
        split_reads(other)


@pytest.mark.parametrize("name", ["paper-coco", "paper-vg"])
def test_the_paper_configs_fine_tune_at_the_papers_batch_of_8_on_8_workers(name):
    cfg = load_config(f"configs/{name}.yaml")
    settings = training.deepspeed_config(cfg, cfg.finetune.batch_size)
    assert cfg.train.num_workers == 8
    assert (settings["train_batch_size"], settings["train_micro_batch_size_per_gpu"],
            settings["gradient_accumulation_steps"]) == (8, 1, 1)


def test_training_refuses_a_generate_folder_that_is_not_complete(tmp_path):
    """A killed generate leaves committed parts but no `_SUCCESS`: a scorer trained then would
    learn from whatever happened to be committed, without a word (issue 31, finding 2)."""
    from rayjobs import train_scorer

    _generated(tmp_path, [f"p{k}" for k in range(8)])
    cfg = load_config(overrides=[f"run_dir={tmp_path}", f"data.source={tmp_path}"])
    with pytest.raises(ConfigError, match=r"generate is not complete \(no _SUCCESS\): run rayjobs.generate"):
        train_scorer.run(cfg)
    assert not (tmp_path / "scorer").exists()  # refused before writing anything


def test_a_training_whose_every_step_was_skipped_ends_the_job():
    """DeepSpeed counts a skipped step (an fp16 overflow, any inf or NaN gradient) in
    `global_steps`: a run of skipped steps only would look trained. Some skipped steps are a
    warning; none, or no step at all (nothing to train on), pass."""
    with pytest.raises(JobError, match=r"^DeepSpeed skipped all 6 optimizer steps \(an inf or NaN "
                                       r"gradient at every step; the fp16 loss scale fell to 0.5\): nothing was "
                                       r"trained, the output is not marked done; each epoch's skipped_steps and "
                                       r"loss_scale are in run/finetune/metrics.jsonl$"):
        training.check_trained("finetune_blip", 6, 6, 0.5, "run/finetune/metrics.jsonl")
    with pytest.raises(JobError, match=r"skipped all 3 optimizer steps \(an inf or NaN gradient at every step\): "):
        training.check_trained("train_scorer", 3, 3, None, "log")
    for steps, skipped in ((6, 5), (6, 0), (0, 0)):
        training.check_trained("finetune_blip", steps, skipped, None, "log")


def test_the_loss_scale_is_the_fp16_optimizers_and_none_without_dynamic_scaling():
    """On a GPU an fp16 engine's ZeRO-1/2 optimizer holds a dynamic loss scaler; bf16 and fp32 a
    static one of scale 1, reported as None (no scaling runs). The ZeRO optimizer's own
    `loss_scale` is read (DeepSpeed builds no fp16 optimizer on a CPU: its state is set here
    as its constructor sets it)."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    settings = DeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                                "fp16": {"enabled": True}}, mpu=None).float16_config
    for dtype, scale in ((torch.float16, 2.0 ** 16), (torch.bfloat16, None), (torch.float32, None)):
        optimizer = DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer)
        optimizer.custom_loss_scaler = False
        optimizer.loss_scaler = CreateLossScaler(dtype, 0, True, settings.dynamic_loss_scale_args())
        optimizer.dynamic_loss_scale = optimizer.loss_scaler.dynamic
        engine = SimpleNamespace(optimizer=optimizer, skipped_steps=3)
        assert training.loss_scaling(engine) == {"skipped_steps": 3, "loss_scale": scale}
