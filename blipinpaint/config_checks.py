"""Checks of a merged config that its types cannot express: choices, ranges, combinations.

OmegaConf already refuses an unknown key or a value of the wrong type; `validate` checks
the rest (fp16 without CUDA, a missing source, a batch that does not split over the
workers) before any work starts, and reports every problem at once in one ConfigError.
Each section of the config has a function that returns its problems. The allowed values
that only these checks and the defaults need live here, so that `config` imports this
module and this module needs `config` for its annotations only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from blipinpaint.errors import ConfigError
from blipinpaint.layout import STEPS
from blipinpaint.masks import MASK_MODES
from blipinpaint.models.presets import PRESET_NAMES, is_inception_weights_file
from blipinpaint.sources import SOURCE_KINDS

if TYPE_CHECKING:
    from blipinpaint.config import (
        CaptionConfig,
        Config,
        DataConfig,
        EvaluateConfig,
        InpaintConfig,
        MaskConfig,
        ModelsConfig,
        StageConfig,
        StreamConfig,
    )

DTYPE_NAMES = ("fp32", "fp16", "bf16")
SHA256 = re.compile(r"[0-9a-f]{64}")
EXPORT_FORMATS = ("hf", "webdataset")
FINETUNE_METHODS = ("scorer", "reward_ranked")
AUTO = "auto"  # a pool size the job works out from the cluster
# `inpaint.compile`: `off` (eager), or a `torch.compile` mode for the UNet. Not the modes that
# capture CUDA graphs (`reduce-overhead`, `max-autotune`): a replayed graph owns its outputs,
# which the fused loop keeps across steps, and no GPU has run them here.
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")


def validate(cfg: Config) -> None:
    """Raise one ConfigError listing every problem of `cfg`; return when there is none."""
    problems = [
        *_job_problems(cfg),
        *_data_problems(cfg.data),
        *_model_problems(cfg.models),
        *_mask_caption_inpaint_problems(cfg.masks, cfg.caption, cfg.inpaint, cfg.models.device),
        *_stream_problems(cfg.stream),
        *_training_problems(cfg),
        *_evaluate_problems(cfg.evaluate),
        *_export_audit_problems(cfg),
    ]
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _job_problems(cfg: Config) -> list[str]:
    """The top-level keys every job reads."""
    problems = []
    if not cfg.progress_s > 0:
        problems.append(f"progress_s={cfg.progress_s} must be a positive number of seconds")
    unknown = [step for step in cfg.restart if step not in STEPS]
    if unknown:
        problems.append(f"restart={list(cfg.restart)}: {', '.join(map(repr, unknown))} is not a step; the steps "
                        f"are {list(STEPS)}")
    return problems


def _data_problems(data: DataConfig) -> list[str]:
    problems = []
    if data.limit is not None and data.limit < 1:
        problems.append(f"data.limit={data.limit} must be at least 1")
    if data.max_file_mb <= 0:
        problems.append(f"data.max_file_mb={data.max_file_mb} must be above 0")
    if data.max_image_mp <= 0:
        problems.append(f"data.max_image_mp={data.max_image_mp} must be above 0 (megapixels)")
    if data.image_size is not None and (data.image_size < 64 or data.image_size % 8):
        problems.append(f"data.image_size={data.image_size} must be a multiple of 8, at least 64")
    source = data.source
    if source is not None and "://" not in source and "{" not in source and not Path(source).exists():
        problems.append(f"data.source={source!r} does not exist")  # (a brace pattern is checked shard by shard)
    if data.kind not in SOURCE_KINDS:
        problems.append(f"data.kind={data.kind!r} is not one of {list(SOURCE_KINDS)}")
    return problems


def _model_problems(models: ModelsConfig) -> list[str]:
    problems = []
    if models.preset not in PRESET_NAMES:
        problems.append(f"models.preset={models.preset!r} is not one of {list(PRESET_NAMES)}")
    if models.device.split(":")[0] not in ("cpu", "cuda"):
        problems.append(f"models.device={models.device!r} must be 'cpu' or 'cuda'")
    if models.dtype not in DTYPE_NAMES:
        problems.append(f"models.dtype={models.dtype!r} is not one of {list(DTYPE_NAMES)}")
    elif models.dtype == "fp16" and not models.device.startswith("cuda"):
        # fp16 kernels and DeepSpeed's fp16 training exist on CUDA only; bf16 runs on CPUs too.
        problems.append("models.dtype=fp16 needs models.device=cuda (on CPU use bf16 or fp32)")
    for role in ("captioner", "inpainter", "clip"):
        if is_inception_weights_file(getattr(models, role)):
            problems.append(f"models.{role}.name_or_path={getattr(models, role).name_or_path!r}: a weights file; "
                            "give a model folder or a hub id (only models.fid takes a .pth file)")
    revision = models.fid.revision
    if is_inception_weights_file(models.fid) and revision is not None and not SHA256.fullmatch(str(revision)):
        problems.append(f"models.fid.revision={revision!r}: for a weights file it is the file's sha256 "
                        "(64 hex digits), or unset for the standard FID weights")
    return problems


def _mask_caption_inpaint_problems(masks: MaskConfig, caption: CaptionConfig, inpaint: InpaintConfig,
                                   device: str) -> list[str]:
    problems = []
    if masks.kind not in MASK_MODES:
        problems.append(f"masks.kind={masks.kind!r} is not one of {list(MASK_MODES)}")
    if inpaint.num_inference_steps is not None and inpaint.num_inference_steps < 1:
        problems.append(f"inpaint.num_inference_steps={inpaint.num_inference_steps} must be at least 1")
    if inpaint.guidance_scale < 1:
        problems.append(f"inpaint.guidance_scale={inpaint.guidance_scale} must be at least 1 (1 = no guidance)")
    if inpaint.compile not in COMPILE_MODES:
        problems.append(f"inpaint.compile={inpaint.compile!r} is not one of {list(COMPILE_MODES)} (off: eager; "
                        "the others are torch.compile modes)")
    area = inpaint.caption_max_mask_area
    if area is not None and not 0 < area < 1:
        problems.append(f"inpaint.caption_max_mask_area={area} must be a share of the image between 0 and 1 "
                        "(or null: always caption)")
    if caption.max_new_tokens < 1 or caption.num_beams < 1:
        problems.append("caption.max_new_tokens and caption.num_beams must be at least 1")
    if caption.candidates < 1:
        problems.append(f"caption.candidates={caption.candidates} must be at least 1 (1: the greedy caption only)")
    if caption.decoder_dtype not in DTYPE_NAMES:
        problems.append(f"caption.decoder_dtype={caption.decoder_dtype!r} is not one of {list(DTYPE_NAMES)}")
    elif caption.decoder_dtype == "fp16" and not device.startswith("cuda"):
        problems.append("caption.decoder_dtype=fp16 needs models.device=cuda (on CPU use bf16 or fp32)")
    return problems


def _stream_problems(stream: StreamConfig) -> list[str]:
    """The streams' stages: the read tasks, the model pools, the commits."""
    problems = []
    for name in ("captioner", "inpainter", "metrics"):
        problems += _stage_problems(f"stream.{name}", getattr(stream, name))
    if stream.read.batch_size < 1 or stream.read.num_cpus <= 0:
        problems.append("stream.read.batch_size must be at least 1 and stream.read.num_cpus above 0")
    if stream.commit.num_cpus <= 0:
        problems.append("stream.commit.num_cpus must be above 0 (a commit task encodes and writes a part)")
    if stream.rows_per_file < 1 or stream.batch_retries < 0 or stream.compact_every < 0:
        problems.append("stream.rows_per_file must be at least 1, stream.batch_retries and stream.compact_every "
                        "at least 0")
    fault = stream.inject_failure
    if fault.stage is not None and fault.stage not in ("prepare", "captioner", "inpainter", "metrics", "fid"):
        problems.append(f"stream.inject_failure.stage={fault.stage!r} is not a stage (prepare, captioner, "
                        "inpainter, metrics or fid)")
    return problems


def _training_problems(cfg: Config) -> list[str]:
    """The two training jobs: `train` (shared), `scorer` and `finetune`."""
    problems = []
    train, scorer, finetune = cfg.train, cfg.scorer, cfg.finetune
    if finetune.method not in FINETUNE_METHODS:
        problems.append(f"finetune.method={finetune.method!r} is not one of {list(FINETUNE_METHODS)}")
    elif finetune.method == "reward_ranked" and cfg.caption.candidates < 2:
        problems.append(f"finetune.method=reward_ranked ranks caption.candidates captions per image: set it to 2 or "
                        f"more (it is {cfg.caption.candidates})")
    if scorer.feature_layer == 0:
        problems.append("scorer.feature_layer=0 is the embeddings, not a layer: -1 is the last layer, -2 the one "
                        "before it")
    if train.zero_stage not in (2, 3):
        problems.append(f"train.zero_stage={train.zero_stage} must be 2 or 3")
    if train.num_workers < 1:
        problems.append(f"train.num_workers={train.num_workers} must be at least 1")
    if train.val_fraction is not None and not 0 < train.val_fraction < 1:
        problems.append(f"train.val_fraction={train.val_fraction} must be between 0 and 1")
    if train.use_gpu and not cfg.models.device.startswith("cuda"):
        problems.append("train.use_gpu=true needs models.device=cuda")
    for key, value in (("scorer.lr", scorer.lr), ("finetune.lr", finetune.lr)):
        if value <= 0:
            problems.append(f"{key}={value} must be positive")
    for key, value in (("scorer.epochs", scorer.epochs), ("scorer.batch_size", scorer.batch_size),
                       ("scorer.checkpoint_every", scorer.checkpoint_every),
                       ("finetune.epochs", finetune.epochs), ("finetune.batch_size", finetune.batch_size),
                       ("finetune.probe_size", finetune.probe_size)):
        if value < 1:
            problems.append(f"{key}={value} must be at least 1")
    for key, value in (("scorer.batch_size", scorer.batch_size), ("finetune.batch_size", finetune.batch_size)):
        if value >= 1 and train.num_workers >= 1 and value % train.num_workers:
            problems.append(f"{key}={value} is the batch per optimizer step over all train.num_workers="
                            f"{train.num_workers}: it must be a multiple of them (each worker takes an equal share)")
    return problems


def _evaluate_problems(evaluate: EvaluateConfig) -> list[str]:
    problems = _stage_problems("evaluate.fid", evaluate.fid)
    if evaluate.limit is not None and evaluate.limit < 2:
        problems.append(f"evaluate.limit={evaluate.limit} must be at least 2 (FID needs two images per set)")
    buckets = list(evaluate.mask_buckets)
    if buckets != sorted(set(buckets)) or not all(0 < edge < 1 for edge in buckets):
        problems.append(f"evaluate.mask_buckets={buckets} must be increasing fractions between 0 and 1")
    bootstrap = evaluate.bootstrap
    if min(bootstrap.replicates, bootstrap.fid_replicates) < 2 or not 0 < bootstrap.confidence < 1:
        problems.append(f"evaluate.bootstrap: replicates={bootstrap.replicates} and fid_replicates="
                        f"{bootstrap.fid_replicates} must be at least 2 and confidence={bootstrap.confidence} "
                        "between 0 and 1")
    if evaluate.grid_rows < 1:
        problems.append(f"evaluate.grid_rows={evaluate.grid_rows} must be at least 1")
    if evaluate.gallery_limit < 0:
        problems.append(f"evaluate.gallery_limit={evaluate.gallery_limit} must be 0 (no gallery) or more")
    return problems


def _export_audit_problems(cfg: Config) -> list[str]:
    """`export` and `audit`, the jobs that read a finished run."""
    problems = []
    export, audit = cfg.export, cfg.audit
    unknown = [f for f in export.formats if f not in EXPORT_FORMATS]
    if unknown or not export.formats or len(set(export.formats)) < len(export.formats):
        problems.append(f"export.formats={list(export.formats)} must name each of {list(EXPORT_FORMATS)} at most "
                        "once, at least one of them")
    if export.rows_per_shard < 1 or export.num_cpus <= 0:
        problems.append(f"export.rows_per_shard={export.rows_per_shard} must be at least 1 and export.num_cpus="
                        f"{export.num_cpus} above 0")
    if audit.size < 1 or audit.num_cpus <= 0:
        problems.append(f"audit.size={audit.size} must be at least 1 and audit.num_cpus={audit.num_cpus} above 0")
    for key, value in (("audit.image_tolerance", audit.image_tolerance),
                       ("audit.score_tolerance", audit.score_tolerance)):
        if value is not None and not value >= 0:
            problems.append(f"{key}={value} must be 0 or more (or null: the precision's)")
    return problems


def _stage_problems(key: str, stage: StageConfig) -> list[str]:
    problems = []
    if stage.batch_size < 1:
        problems.append(f"{key}.batch_size={stage.batch_size} must be at least 1")
    if stage.num_cpus < 0 or stage.num_gpus < 0:
        problems.append(f"{key}: num_cpus and num_gpus cannot be negative")
    autoscaling = stage.min_size is not None or stage.max_size is not None
    if autoscaling:
        if stage.min_size is None or stage.max_size is None or not 0 < stage.min_size <= stage.max_size:
            problems.append(f"{key}: an autoscaling pool needs 1 <= min_size <= max_size, "
                            f"got min_size={stage.min_size}, max_size={stage.max_size}")
    elif stage.size == AUTO:
        if not key.startswith("stream."):
            problems.append(f"{key}.size=auto: only the stream's model stages size themselves; give a number")
    elif not isinstance(stage.size, int) or stage.size < 1:
        problems.append(f"{key}.size={stage.size} must be at least 1, or auto (or set min_size and max_size)")
    return problems
