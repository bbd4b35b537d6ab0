"""Build each pipeline stage from the job config: where config meets models.

A builder resolves the preset, device and dtype and loads its model once; the stage it
returns is a plain callable over batch dicts. Ray jobs call the builders inside their
actors (so weights load on the worker that uses them); the tests and the local run call
them in-process.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from blipinpaint.acceleration import channels_last, compile_unet
from blipinpaint.candidates import CandidateCaptioner
from blipinpaint.captioning import Captioner, Reranker
from blipinpaint.config import Config, model_store
from blipinpaint.fid import FidFeatures
from blipinpaint.inpainting import Inpainter
from blipinpaint.io import ImageDecoder
from blipinpaint.losses import LossWeights
from blipinpaint.masks import MaskGenerator
from blipinpaint.metrics import InpaintMetrics
from blipinpaint.models import (
    CaptionerModel,
    ModelRef,
    Preset,
    describe_fid_features,
    get_preset,
    load_captioner,
    load_clip,
    load_fid_features,
    load_inpaint_pipeline,
    native_image_size,
    store,
    torch_device,
    torch_dtype,
    with_overrides,
)
from blipinpaint.models.loading import DTYPES
from blipinpaint.models.offline import BUILD_VERSION, SPECS
from blipinpaint.models.presets import PAPER
from blipinpaint.precision import surviving_changes
from blipinpaint.scorer import ScoreNet
from blipinpaint.storage import folder_digest, is_remote, local_dir

ROLES = ("captioner", "inpainter", "clip", "fid")

# Denoising steps when the config leaves them unset: the paper's 50 on real models; few
# on the tiny ones, whose outputs are noise either way and only need to run the code.
DEFAULT_STEPS = {"tiny": 4, "paper": 50, "fullsize": 50}


def configured_ref(cfg: Config, role: str) -> ModelRef | None:
    """The checkpoint configured for `role`: its override, else the `paper` preset's; None for
    an offline preset's own model (built on first use). Known without building or downloading."""
    ref = getattr(cfg.models, role)
    if ref.name_or_path:
        return ref
    return getattr(PAPER, role) if cfg.models.preset not in SPECS else None


def stored_refs(cfg: Config) -> dict[str, ModelRef]:
    """The roles whose checkpoint goes through the model store (hub ids, the FID Inception)."""
    refs = {role: configured_ref(cfg, role) for role in ROLES}
    return {role: ref for role, ref in refs.items() if ref is not None and store.needs_store(ref)}


def fill_store(cfg: Config) -> dict[str, dict]:
    """Every stored role's checkpoint into the run's model store, fetched and verified once
    (found complete, nothing is fetched): {role: {uri, source, files, reused}}. Runs on a
    job's driver before any actor loads a model."""
    root = model_store(cfg)
    entries = {}
    for role, ref in stored_refs(cfg).items():
        uri = store.entry_uri(root, ref)
        entries[role] = {"uri": uri, **store.put(ref, uri)}
    return entries


def configured_preset(cfg: Config) -> Preset:
    """The checkpoint of each role as configured (hub ids included)."""
    models = cfg.models
    return with_overrides(get_preset(models.preset), captioner=models.captioner, inpainter=models.inpainter,
                          clip=models.clip, fid=models.fid)


def resolve_preset(cfg: Config) -> Preset:
    """The folder each role loads from: hub checkpoints from the model store, never the hub."""
    preset, root = configured_preset(cfg), model_store(cfg)
    return replace(preset, **{role: store.in_store(getattr(preset, role), root) for role in ROLES})


def image_size(cfg: Config) -> int:
    return cfg.data.image_size or native_image_size(cfg.models.preset)


def inference_steps(cfg: Config) -> int:
    return cfg.inpaint.num_inference_steps or DEFAULT_STEPS[cfg.models.preset]


def _device_dtype(cfg: Config):
    device = torch_device(cfg.models.device)
    return device, torch_dtype(cfg.models.dtype, device)


def build_decoder(cfg: Config) -> ImageDecoder:
    return ImageDecoder(image_size(cfg), cfg.data.min_side, cfg.data.max_aspect_ratio,
                        round(cfg.data.max_image_mp * 1e6))


def build_masker(cfg: Config) -> MaskGenerator:
    return MaskGenerator(cfg.masks.kind, image_size(cfg), cfg.seed)


def decoder_dtype(cfg: Config) -> torch.dtype:
    """The precision BLIP's text decoder captions in (`caption.decoder_dtype`)."""
    return torch_dtype(cfg.caption.decoder_dtype, torch_device(cfg.models.device))


def load_blip(cfg: Config, ref: ModelRef | None = None) -> CaptionerModel:
    """BLIP from the preset, or from `ref` (e.g. the fine-tuned folder): its vision encoder in
    `models.dtype`, its text decoder in `caption.decoder_dtype`. Every captioner of every job
    loads it so: the original and the fine-tuned captions compare at one precision."""
    device, dtype = _device_dtype(cfg)
    return load_captioner(ref or resolve_preset(cfg).captioner, device, dtype, decoder_dtype(cfg))


def decoder_survival(cfg: Config, tuned: ModelRef) -> dict:
    """`precision.surviving_changes` of the text decoder of `tuned` (the fine-tuned BLIP)
    against the configured captioner's, at `caption.decoder_dtype`: both loaded in fp32 on
    the CPU, through the captioner's own loading (the names its weights load under)."""
    cpu = torch.device("cpu")
    original, fine_tuned = (dict(load_captioner(ref, cpu).model.text_decoder.named_parameters())
                            for ref in (resolve_preset(cfg).captioner, tuned))
    return surviving_changes(original, fine_tuned, DTYPES[cfg.caption.decoder_dtype])


def build_captioner(cfg: Config, ref: ModelRef | None = None, output: str = "caption") -> Captioner:
    """BLIP from the preset, or from `ref` (e.g. the fine-tuned folder), writing `output`."""
    model = load_blip(cfg, ref)
    return Captioner(model, cfg.caption.max_new_tokens, cfg.caption.num_beams, output, cfg.scorer.feature_layer)


def loss_weights(cfg: Config) -> LossWeights:
    """The paper's L_BLIP weights (λ1, λ2, λ3), as `finetune` sets them."""
    return LossWeights(cfg.finetune.lambda_ssim, cfg.finetune.lambda_psnr, cfg.finetune.lambda_clip)


def build_reranker(cfg: Config, scorer_dir: str) -> Reranker:
    """The original BLIP proposing `caption.candidates` captions, ranked by the trained scorer
    in `scorer_dir` (a folder or a bucket prefix)."""
    model = load_blip(cfg)
    scorer = ScoreNet.from_pretrained(local_dir(scorer_dir))
    caption = cfg.caption
    return Reranker(model, scorer, loss_weights(cfg), caption.candidates, cfg.seed, caption.max_new_tokens,
                    caption.num_beams, cfg.scorer.feature_layer)


def build_candidate_captioner(cfg: Config) -> CandidateCaptioner:
    """The original BLIP proposing `caption.candidates` captions per image, a row each."""
    model = load_blip(cfg)
    caption = cfg.caption
    return CandidateCaptioner(model, caption.candidates, cfg.seed, caption.max_new_tokens, caption.num_beams)


def build_inpainter(cfg: Config, prompts: dict[str, str | None] | None = None) -> Inpainter:
    """SD inpainting making `prompts`' variants (default: generate's two). On CUDA its UNet and
    VAE are channels-last; with `inpaint.compile` its UNet is compiled here, on a batch of
    `stream.inpainter.batch_size` rows, the one size it then runs (`Inpainter`'s `fixed_shape`)."""
    device, dtype = _device_dtype(cfg)
    pipe = load_inpaint_pipeline(resolve_preset(cfg).inpainter, device, dtype)
    if device.type == "cuda":
        channels_last(pipe)
    compiled = cfg.inpaint.compile != "off"
    compile_unet(pipe, cfg.inpaint.compile)
    return Inpainter(pipe, inference_steps(cfg), cfg.inpaint.guidance_scale, cfg.seed, prompts,
                     cfg.inpaint.caption_max_mask_area,
                     fixed_shape=(cfg.stream.inpainter.batch_size, image_size(cfg)) if compiled else None)


def build_metrics(cfg: Config, variants: dict[str, tuple[str, str]] | None = None) -> InpaintMetrics:
    """CLIP and the SSIM/PSNR functions, ready for the first batch.

    torchmetrics (and scipy under it) is imported here, in the metrics actor's start, not by
    its first batch (`metrics.ssim_psnr`): the actor starts beside the pool's others and waits
    for the inpainter's first rows, so the import (1-2 s on 2 quiet cores, 11 s at load 20)
    overlaps the inpainter's start instead of following its first batch on the stream's
    critical path. Only the metrics actor pays it; modules importing the stages do not.
    """
    import torchmetrics.functional.image  # noqa: F401 - the import is the point

    device, dtype = _device_dtype(cfg)
    return InpaintMetrics(load_clip(resolve_preset(cfg).clip, device, dtype), variants)


def fid_device(cfg: Config) -> torch.device:
    """The device of the FID workers and the bootstrap task: CUDA when `models.device` or
    `evaluate.fid.num_gpus` (the workers hold a GPU) asks for it, and then an error where
    there is none, never a silent CPU."""
    name = cfg.models.device
    if cfg.evaluate.fid.num_gpus > 0 and not name.startswith("cuda"):
        name = "cuda"
    try:
        return torch_device(name)
    except RuntimeError:
        raise RuntimeError(f"models.device={cfg.models.device!r} and evaluate.fid.num_gpus="
                           f"{cfg.evaluate.fid.num_gpus} ask for CUDA for FID, but this worker has no CUDA "
                           "device") from None


def build_fid(cfg: Config, sets: dict[str, str]) -> FidFeatures:
    """FID features of the PNG columns `sets`, in chunks of `evaluate.fid.batch_size` rows
    (the feature network runs in fp32, on `fid_device`)."""
    device = fid_device(cfg)
    return FidFeatures(load_fid_features(resolve_preset(cfg).fid, device), device, sets, cfg.evaluate.fid.batch_size)


def fid_network(cfg: Config) -> dict:
    """Which FID network the workers load (`describe_fid_features` of its folder); after `fill_store`."""
    return describe_fid_features(resolve_preset(cfg).fid)


def model_ids(cfg: Config) -> dict[str, str]:
    """The checkpoint each role runs, as recorded on every sample (no build, no download)."""
    ids = {}
    for role in ROLES:
        ref = configured_ref(cfg, role)
        if ref is None:
            ids[role] = f"offline:{cfg.models.preset}-v{BUILD_VERSION}/{role}"
        else:
            ids[role] = ref.name_or_path + (f"@{ref.revision}" if ref.revision else "")
    return ids


def model_digests(cfg: Config, roles: tuple[str, ...] = ROLES) -> dict[str, str]:
    """The content digest of the checkpoint each role loads (`storage.folder_digest`): what a
    fingerprint records, so that other bytes under the same name never pass for the same model.
    Run after `fill_store`: a stored checkpoint is digested where the workers load it."""
    preset = resolve_preset(cfg)
    return {role: digest_once(getattr(preset, role).name_or_path) for role in roles}


# Local folders already hashed by this process: (folder, its files' stat) -> digest.
_DIGESTS: dict[tuple, str] = {}
# A file changed this recently may change again within the same timestamp tick (the kernel
# stamps from a coarse clock) and keep its stat: its folder is hashed, never kept (git's
# "racy" rule).
RACY_S = 1.0


def _files_stat(folder: Path) -> tuple:
    """Each file's name, size, inode and modification and change times (ns). The change time
    cannot be set back by a writer: a file rewritten after this has another one."""
    return tuple((path.relative_to(folder).as_posix(), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
                 for path in sorted(p for p in folder.rglob("*") if p.is_file()) for st in (path.stat(),))


def digest_once(uri: str) -> str:
    """`folder_digest(uri)`, hashed once per process while the local folder's files are the
    same files: the same names, sizes, inodes, modification and change times.

    A pipeline's driver asks for the models' digests about seven times (each job's fingerprint
    and its checks); a local folder is hashed in full each time, seconds per GB on real
    checkpoints. A digest is kept only when no file changed while it was hashed or within
    `RACY_S` before: a file written since then has another change time, so it is hashed
    again. A bucket folder's digest is its manifest's (one small read), never kept."""
    if is_remote(uri) or not Path(uri.removeprefix("file://")).is_dir():
        return folder_digest(uri)  # a bucket, or a missing folder: `folder_digest` says what is wrong
    folder = Path(uri.removeprefix("file://")).resolve()
    before, now_ns = _files_stat(folder), time.time_ns()
    key = (str(folder), before)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = folder_digest(uri)
    settled = all(max(mtime, ctime) < now_ns - RACY_S * 1e9 for *_, mtime, ctime in before)
    if settled and _files_stat(folder) == before:
        _DIGESTS[key] = digest
    return digest
