"""Job configuration: dataclass defaults, then a YAML file, then dotted overrides.

OmegaConf merges the three against the dataclass schema, so an unknown key or a value
of the wrong type is an error naming the key. `config_checks.validate` then checks what
types cannot (choices, ranges, fp16 without CUDA, a missing source) before any work starts.
The defaults are the embedded default run: the `tiny` preset on the shipped samples.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from blipinpaint.config_checks import AUTO, validate
from blipinpaint.errors import ConfigError
from blipinpaint.layout import RunLayout
from blipinpaint.models.presets import ModelRef, weights_file_in
from blipinpaint.seeds import raised_fraction

log = logging.getLogger(__name__)


def sample_images_dir() -> Path:
    """The real photographs (free licences) that ship with the package."""
    return Path(str(resources.files("blipinpaint") / "samples"))


@dataclass
class DataConfig:
    source: str | None = None  # path or s3:// URI; None: the shipped sample images
    kind: str = "auto"  # auto | folder | coco | visualgenome | manifest | webdataset | parquet_images
    image_root: str | None = None  # where the files named by coco/visualgenome/manifest lie
    limit: int | None = None  # use at most this many inputs
    image_column: str = "image"  # parquet_images: the column of encoded images (bytes or {bytes, path})
    id_column: str | None = None  # parquet_images: the id column; None: `<file>/<row>`
    image_size: int | None = None  # None: the preset's native resolution
    min_side: int = 32  # shorter sides below this are an error, not an upscale
    max_aspect_ratio: float = 4.0  # wider images are an error, not a sliver crop
    max_file_mb: float = 50.0  # larger files are an error row, never read into a worker's memory
    # Images of more pixels are an error row, told from the header before any pixel is decoded:
    # a small file can decode to gigabytes (a 0.3 MB PNG to 9400x9400 RGBA). 8K frames fit.
    max_image_mp: float = 33.5
    name: str | None = None  # the dataset's name in reports; None: from the source's file or folder name


@dataclass
class ModelsConfig:
    preset: str = "tiny"  # tiny | paper | fullsize
    device: str = "cpu"  # cpu | cuda; decided per worker, never probed on the driver
    dtype: str = "fp32"  # fp32 | fp16 (CUDA only) | bf16 (CPU or CUDA)
    # Point a role elsewhere (a local folder, or a hub id with its revision).
    captioner: ModelRef = field(default_factory=ModelRef)
    inpainter: ModelRef = field(default_factory=ModelRef)
    clip: ModelRef = field(default_factory=ModelRef)
    fid: ModelRef = field(default_factory=ModelRef)  # the FID feature network
    # Where hub checkpoints are kept as verified safetensors for the workers (rayjobs.models);
    # None: `<run_dir>/models`. Entries are immutable (repo and commit), so runs may share one.
    store: str | None = None


@dataclass
class MaskConfig:
    kind: str = "box"  # box (the paper's) | thin | medium | thick | mixed


@dataclass
class CaptionConfig:
    max_new_tokens: int = 30
    num_beams: int = 1
    # Captions proposed per image: the greedy one and `candidates - 1` sampled (seeded per
    # sample). Above 1, evaluate adds the "+ scorer-reranked caption" variant (the frozen
    # scorer picks among them) and `finetune.method=reward_ranked` inpaints and scores them.
    candidates: int = 1
    # The precision BLIP's text decoder captions in, in every job (generate, candidates,
    # evaluate, the fine-tune's probe set); the vision encoder stays at `models.dtype`. fp32,
    # the fine-tune's master weights': at lr 1e-6 a half-precision cast rounds most of the
    # fine-tune back to the original weights (docs/models.md, "Precision").
    decoder_dtype: str = "fp32"


@dataclass
class InpaintConfig:
    num_inference_steps: int | None = None  # None: the preset's (50 for paper)
    guidance_scale: float = 7.5
    # A sample whose mask hides more than this share of the image is inpainted without text
    # in every variant (the paper's failure case: a caption of what little is left misleads
    # the inpainter). None: always with the caption.
    caption_max_mask_area: float | None = None
    # `off`, or the torch.compile mode of the UNet (`default`, `max-autotune-no-cudagraphs`):
    # batches then pad to `stream.inpainter.batch_size` rows, so that it compiles once.
    compile: str = "off"


@dataclass
class StageConfig:
    """Resources of one actor-pool stage: a fixed `size`, `min_size`..`max_size` (autoscaling),
    or (the stream's model stages) `size: auto`, sized from the cluster when the job starts
    (`rayjobs.cluster.size_pools`)."""

    batch_size: int = 4
    num_cpus: float = 0.5  # fractions let several small actors share a core
    num_gpus: float = 0.0  # fractions let BLIP and CLIP share one GPU
    size: int | str | None = 1
    min_size: int | None = None
    max_size: int | None = None


@dataclass
class ReadConfig:
    """The CPU work before the models: read, decode, validate, resize, mask (Ray tasks)."""

    batch_size: int = 8
    num_cpus: float = 0.25


@dataclass
class CommitConfig:
    """The commit tasks at the stream's end: encode a part's rows (PNGs, Parquet) and commit it.

    A CPU share of their own, apart from the read tasks': Ray Data reserves each stage's
    share in stream order, so on a cluster the pools fill, a commit that shares the read
    tasks' share waits while reads keep coming (BENCHMARKS.md, a real run at 10^6)."""

    num_cpus: float = 0.25


@dataclass
class FaultConfig:
    """Fault injection for the reliability tests: `stage` fails on every batch holding input `id`."""

    stage: str | None = None  # prepare | captioner | inpainter | metrics | fid
    id: str | None = None
    exit: bool = False  # the worker process dies (a crash), instead of the stage raising
    times: int | None = None  # with `exit`: die on the first `times` starts of that batch only (None: every start)
    # Node-loss tests: the stage's worker, on the batch holding `id`, writes `<hold>.reached`
    # and waits until the local file `hold` exists: a node can be removed at a known point.
    hold: str | None = None


@dataclass
class StreamConfig:
    """The streams of the generate, candidates and evaluate jobs: read tasks, model actor
    pools, commits (the config key was `generate`, which still works)."""

    read: ReadConfig = field(default_factory=ReadConfig)
    # The inpainter is nearly all the work: BLIP and CLIP take a quarter of a core each, and
    # the inpainter pool what they and the read tasks leave (`size: auto`).
    captioner: StageConfig = field(default_factory=lambda: StageConfig(num_cpus=0.25, size=AUTO))
    inpainter: StageConfig = field(default_factory=lambda: StageConfig(size=AUTO))
    metrics: StageConfig = field(default_factory=lambda: StageConfig(num_cpus=0.25, size=AUTO))
    rows_per_file: int = 64  # rows gathered into one Parquet file (and one commit)
    commit: CommitConfig = field(default_factory=CommitConfig)
    batch_retries: int = 2  # a batch that keeps failing becomes error rows after this many retries
    retry_failed: bool = False  # try `stage failed` error rows of earlier runs again (e.g. after preemptions)
    # A commit that finds this many loose markers folds them into a checkpoint (0: only when
    # the run ends): a resume then reads at most about this many markers one by one.
    compact_every: int = 500
    inject_failure: FaultConfig = field(default_factory=FaultConfig)  # tests only


@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed settings shared by the two training jobs."""

    num_workers: int = 2
    use_gpu: bool = False  # one GPU per worker; the CPU path uses gloo
    cpus_per_worker: float = 0.5  # leaves CPU for the Ray Data tasks that feed the workers
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 2 (default) or 3
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory
    max_failures: int = 2  # worker failures survived per run, each resuming from its last checkpoint
    # Held-out split (the evaluation set), chosen by a hash of (seed, id); None: see `heldout_fraction`.
    val_fraction: float | None = None
    inject_failure_at_step: int | None = None  # fault-injection tests: a worker dies at this step, once
    tensorboard: bool = False  # also write metrics as TensorBoard events (`<job>/tensorboard/`)


@dataclass
class ScorerConfig:
    # The text decoder's layer whose output feeds the scorer: -2, the second-to-last, as the
    # paper says (docs/method.md, "Which layer feeds the scorer"). Generation, scorer training and
    # fine-tuning must use the same; a run folder refuses another.
    feature_layer: int = -2
    hidden: list[int] = field(default_factory=lambda: [512, 256])
    lr: float = 1e-4  # the paper's Adam settings
    epochs: int = 50
    batch_size: int = 64  # per optimizer step, over all workers
    # Epochs are short (a pass over cached features): a checkpoint every epoch would cost more
    # than the epoch. A failure redoes at most this many epochs.
    checkpoint_every: int = 10


@dataclass
class FinetuneConfig:
    # scorer: the paper's (the decoder follows the frozen scorer's slope); reward_ranked: the
    # decoder learns, by its language-model loss, the best of `caption.candidates` captions
    # per training image by the real metrics' L_BLIP (rejection-sampling fine-tuning).
    method: str = "scorer"
    lr: float = 1e-6  # the paper's: small, so BLIP changes slowly
    epochs: int = 3
    batch_size: int = 8  # the paper's, per optimizer step over all workers (8 workers: one sample each)
    lambda_ssim: float = 0.5  # λ1
    lambda_psnr: float = 0.2  # λ2
    lambda_clip: float = 4.0  # λ3
    kl_weight: float = 0.0  # > 0 adds KL to the original decoder (keeps captions fluent)
    probe_size: int = 8  # training and as many held-out images captioned before training and after each epoch


@dataclass
class BootstrapConfig:
    """Percentile bootstrap over samples for the report's intervals (seeded by `seed`)."""

    replicates: int = 1000
    # FID draws cost a covariance and an eigendecomposition per image set each (2048-d on
    # `paper`: on the FID workers' GPU when they have one).
    fid_replicates: int = 200
    confidence: float = 0.95


@dataclass
class EvaluateConfig:
    limit: int | None = None  # evaluate at most this many held-out samples (chosen by a hash, not order)
    fid: StageConfig = field(default_factory=lambda: StageConfig(batch_size=32))  # FID feature workers
    mask_buckets: list[float] = field(default_factory=lambda: [0.1, 0.3])  # mask-area edges between buckets
    grid_rows: int = 6  # samples in the qualitative grid
    gallery_limit: int = 200  # samples in report.html's gallery (chosen by a hash); 0: none
    other_runs: list[str] = field(default_factory=list)  # run_dirs whose evaluations join this table
    retry_failed: bool = False  # try `stage failed` error rows of earlier evaluate runs again
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)


@dataclass
class ExportConfig:
    """`rayjobs.export`: generate's committed rows as a Hugging Face dataset folder and WebDataset shards."""

    out: str | None = None  # a folder or bucket prefix; None: <run_dir>/export
    formats: list[str] = field(default_factory=lambda: ["hf", "webdataset"])  # hf | webdataset
    # Samples per Parquet file and per tar shard: about 1.5 MB a sample at 512 px (four PNGs),
    # so a shard of 256 is some 400 MB, held by one task as it streams (a source part at a time).
    rows_per_shard: int = 256
    num_cpus: float = 1.0  # per shard-writing task (reading, hashing and writing bytes)
    # Tests only: the task writing this shard (e.g. train-00001-of-00003) kills the job's driver
    # when half of the shard's tar is written, as a lost head node or `kill -9` would end the job.
    inject_kill: str | None = None


@dataclass
class AuditConfig:
    """`rayjobs.audit`: a seeded random sample of generate's committed rows, recomputed and compared."""

    size: int = 8  # rows recomputed (all, when the run has fewer)
    seed: int = 0  # which rows: a hash order of (seed, id), stable across runs of the audit
    # Largest difference still taken as equal, in 8-bit levels (inpainted images) and in the
    # scores' own units (metrics, caption features); None: the precision's (`audit.TOLERANCES`).
    image_tolerance: int | None = None
    score_tolerance: float | None = None
    num_cpus: float = 1.0  # the recomputing task (one thread per CPU, as generate's workers had)
    out: str | None = None  # where report.json goes; None: <run_dir>/audit


@dataclass
class Config:
    run_dir: str = "runs/default"
    ray_address: str | None = None  # None: $RAY_ADDRESS (set by `ray job submit`), else a local Ray
    seed: int = 0
    # A job's own progress: a line every this many seconds in which rows were committed (a
    # training step or epoch line at most this often); a bar instead when the output is a terminal.
    progress_s: float = 30.0
    ray_progress: bool = False  # Ray Data's per-operator progress bars too (a line per redraw in a log)
    # Steps whose output may be replaced when it was made under other settings or inputs: it is
    # moved aside under a dated name and redone, with what reads it (generate, candidates,
    # scorer, finetune, eval, export). Without, such a step refuses to run.
    restart: list[str] = field(default_factory=list)
    # Generate (and the pipeline) only plan: list, read the log, print what a run would do
    # and cost, write `run_dir/plan.json`; no model is fetched, no actor starts.
    dry_run: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `dotted.key=value` overrides, validated."""
    layers = [OmegaConf.structured(Config)]
    try:
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            layers.append(_renamed(OmegaConf.load(path), str(path)))
        bad = [override for override in overrides if "=" not in override]
        if bad:
            raise ConfigError(f"overrides must look like dotted.key=value, got {bad}")
        layers.append(_renamed(OmegaConf.from_dotlist(list(overrides)), "the overrides"))
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as err:
        where = f" in {path}" if path else ""
        key = f"{err.full_key}: " if getattr(err, "full_key", None) else ""
        first_line = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"invalid config{where}: {key}{first_line}") from None
    _absolute_paths(cfg)
    # YAML reads `off` (and `no`, `false`) as false, which a string key holds as "False".
    if cfg.inpaint.compile == "False":
        cfg.inpaint.compile = "off"
    validate(cfg)
    return cfg


# Config sections that were renamed: {old: new}. The old name keeps working, with a notice.
RENAMED = {"generate": "stream"}  # it sets the streams of generate, candidates and evaluate


def _renamed(layer, where: str):
    """`layer` (a YAML file's or the overrides' config) with renamed sections under their new names."""
    for old, new in RENAMED.items():
        if old not in layer:
            continue
        if new in layer:
            raise ConfigError(f"both `{old}` and `{new}` are set in {where}: `{old}` is the old name of `{new}`; "
                              "keep one")
        log.warning("%s: the config section `%s` is now `%s` (read as `%s`)", where, old, new, new)
        layer[new] = layer.pop(old)
    return layer


def _absolute_paths(cfg: Config) -> None:
    """Local paths made absolute: Ray workers run in other working directories."""

    def absolute(path: str | None) -> str | None:
        return path if not path or "://" in path else str(Path(path).expanduser().absolute())

    cfg.run_dir = absolute(cfg.run_dir)
    cfg.data.source = absolute(cfg.data.source)
    cfg.data.image_root = absolute(cfg.data.image_root)
    cfg.evaluate.other_runs = [absolute(run) for run in cfg.evaluate.other_runs]
    cfg.models.store = absolute(cfg.models.store)
    cfg.export.out = absolute(cfg.export.out)
    cfg.audit.out = absolute(cfg.audit.out)
    for ref in (cfg.models.captioner, cfg.models.inpainter, cfg.models.clip, cfg.models.fid):
        if ref.name_or_path and Path(ref.name_or_path).expanduser().exists():
            ref.name_or_path = absolute(ref.name_or_path)
    # A folder holding the FID Inception's weights file stands for that file, here on the
    # driver: workers, which may not see the folder, find the file's store entry by its name.
    weights = weights_file_in(Path(cfg.models.fid.name_or_path)) if cfg.models.fid.name_or_path else None
    if weights is not None:
        cfg.models.fid.name_or_path = str(weights)


def model_store(cfg: Config) -> str:
    """`models.store`, else `<run_dir>/models`."""
    return cfg.models.store or RunLayout(cfg.run_dir).models


def heldout_fraction(cfg: Config, ids: Iterable[str] | None = None) -> float:
    """The held-out share: `train.val_fraction`, else 0.2; on the 6 shipped samples, half,
    so the embedded default keeps images back for its evaluation. Given the generated
    `ids`, raised on a small dataset until two of them are held out (`seeds.raised_fraction`)."""
    if cfg.train.val_fraction is not None:
        fraction = cfg.train.val_fraction
    else:
        fraction = 0.5 if cfg.data.source is None else 0.2
    return fraction if ids is None else raised_fraction(cfg.seed, ids, fraction)


def dataset_name(cfg: Config) -> str:
    """`data.name`, else the source's file or folder name (without extension)."""
    if cfg.data.name:
        return cfg.data.name
    if cfg.data.source is None:
        return "samples"
    return Path(cfg.data.source.rstrip("/")).stem or cfg.data.source


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def parse_args(argv: list[str] | None = None, description: str | None = None) -> Config:
    """The command line every job shares: `--config FILE` and `dotted.key=value` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config; without it the embedded default (tiny preset, samples)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. data.limit=8")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
