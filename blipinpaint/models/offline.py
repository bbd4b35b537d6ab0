"""Random-init models built offline from configs written here, saved like real checkpoints.

Two sizes share one builder:
- `tiny`: diffusers-test-sized models that run the whole pipeline on a CPU in seconds.
- `fullsize`: the `paper` architectures (BLIP base, SD 1.5 inpaint, CLIP ViT-L/14) with
  random weights, for GPU throughput benchmarks (speed does not depend on the values).

Each build is written once with `save_pretrained` (safetensors) into a cache folder and
then loaded through the same `from_pretrained` code as a downloaded checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blipinpaint.models.inception import InceptionConfig, InceptionFeatures
from blipinpaint.models.vocab import write_clip_bpe, write_wordpiece_vocab

# diffusers and transformers are imported where a model is built: every process that reads
# a config imports this module (for the presets' sizes), and those imports take seconds.
if TYPE_CHECKING:
    from diffusers import StableDiffusionInpaintPipeline
    from transformers import BertTokenizer, BlipForConditionalGeneration, CLIPModel, CLIPTokenizer

# Bump when a builder changes, so stale caches are rebuilt instead of reused.
BUILD_VERSION = 1
SEED = 0
COMPONENTS = ("captioner", "inpainter", "clip", "fid")


@dataclass(frozen=True)
class OfflineSpec:
    """Architecture sizes of one offline preset."""

    image_size: int
    blip_image_size: int
    blip_vision: dict
    blip_text: dict
    unet: dict
    vae: dict
    sd_text: dict
    clip_image_size: int
    clip_vision: dict
    clip_text: dict
    clip_projection_dim: int
    inception: InceptionConfig
    text_vocab_size: int | None = None  # None: the offline tokenizer's size
    blip_vocab_size: int | None = None


TINY = OfflineSpec(
    image_size=64,
    blip_image_size=32,
    blip_vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=8),
    # Three decoder layers, so "second-to-last layer" is a real intermediate layer; a wider
    # init than BLIP's 0.02 lets the image steer the random decoder (distinct captions).
    blip_text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=64, initializer_range=0.1),
    # diffusers' own inpaint test sizes: two UNet blocks, 9 input channels (latents, mask, masked image).
    unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, cross_attention_dim=32,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    vae=dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=64,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    sd_text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    clip_image_size=32,
    clip_vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=8),
    clip_text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    clip_projection_dim=32,
    inception=InceptionConfig(width=8, num_blocks=2, num_features=64, input_size=64),
)

# Sizes of Salesforce/blip-image-captioning-base, SD 1.5 inpainting and CLIP ViT-L/14.
FULLSIZE = OfflineSpec(
    image_size=512,
    blip_image_size=384,
    blip_vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     patch_size=16),
    blip_text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=512),
    unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64,
              cross_attention_dim=768, attention_head_dim=8,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    sd_text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu"),
    clip_image_size=224,
    clip_vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14),
    clip_text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    clip_projection_dim=768,
    inception=InceptionConfig(width=64, num_blocks=3, num_features=2048, input_size=299),
    text_vocab_size=49408,
    blip_vocab_size=30524,
)

SPECS = {"tiny": TINY, "fullsize": FULLSIZE}


def cache_root() -> Path:
    """Where offline builds live: $BLIPINPAINT_CACHE, else ~/.cache/blipinpaint."""
    return Path(os.environ.get("BLIPINPAINT_CACHE", Path.home() / ".cache" / "blipinpaint"))


def ensure_built(name: str, root: Path | None = None) -> Path:
    """Return the folder of offline preset `name`, building it on first use.

    Built in a temporary sibling and renamed into place, so concurrent builders (several
    actors on one node) never see a half-written folder; the loser discards its copy.
    """
    if name not in SPECS:
        raise ValueError(f"no offline preset {name!r}; known: {sorted(SPECS)}")
    target = (root or cache_root()) / "offline" / f"{name}-v{BUILD_VERSION}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(SPECS[name], staging)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build(spec: OfflineSpec, directory: Path) -> None:
    """Build and save every component of `spec` under `directory/<component>`."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards": noise in a job's log, where workers build
    directory = Path(directory)
    _build_captioner(spec, directory / "captioner")
    _build_inpainter(spec, directory / "inpainter")
    _build_clip(spec, directory / "clip")
    torch.manual_seed(SEED)
    InceptionFeatures(spec.inception).save_pretrained(directory / "fid")


def blip_tokenizer(directory: Path) -> BertTokenizer:
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokens = write_wordpiece_vocab(directory).read_text().splitlines()
    # BLIP's decoder starts from [DEC]: the real checkpoint's tokenizer has it as bos.
    return BertTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, bos_token="[DEC]", model_max_length=512)


def clip_tokenizer(directory: Path) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    write_clip_bpe(directory)
    # CLIP reads 77 tokens; the saved tokenizer carries the limit, as real checkpoints do.
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=77)


def make_captioner(spec: OfflineSpec, tokenizer: BertTokenizer) -> BlipForConditionalGeneration:
    from transformers import BlipConfig, BlipForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        spec.blip_text,
        vocab_size=spec.blip_vocab_size or len(tokenizer),
        encoder_hidden_size=spec.blip_vision["hidden_size"],
        bos_token_id=ids("[DEC]"), pad_token_id=ids("[PAD]"),
        sep_token_id=ids("[SEP]"), eos_token_id=ids("[SEP]"),
    )
    # BLIP's vision default init (std 1e-10) would make random captions ignore the image.
    vision = dict(spec.blip_vision, image_size=spec.blip_image_size, initializer_range=0.02)
    torch.manual_seed(SEED)
    return BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))


def make_inpainter(spec: OfflineSpec, tokenizer: CLIPTokenizer) -> StableDiffusionInpaintPipeline:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(in_channels=9, out_channels=4, **spec.unet)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **spec.vae)
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=spec.text_vocab_size or len(tokenizer), max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **spec.sd_text,
    ))
    # SD 1.5's own scheduler settings.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def make_clip(spec: OfflineSpec, tokenizer: CLIPTokenizer) -> CLIPModel:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(spec.clip_text, vocab_size=spec.text_vocab_size or len(tokenizer),
                         max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(spec.clip_vision, image_size=spec.clip_image_size),
        projection_dim=spec.clip_projection_dim,
    )
    torch.manual_seed(SEED)
    return CLIPModel(config)


def _build_captioner(spec: OfflineSpec, out: Path) -> None:
    from transformers import BlipImageProcessorPil

    tokenizer = blip_tokenizer(out)
    model = make_captioner(spec, tokenizer)
    model.generation_config.max_new_tokens = 20
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    size = spec.blip_image_size
    BlipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(out)


def _build_inpainter(spec: OfflineSpec, out: Path) -> None:
    make_inpainter(spec, clip_tokenizer(out / "tokenizer")).save_pretrained(out, safe_serialization=True)


def _build_clip(spec: OfflineSpec, out: Path) -> None:
    from transformers import CLIPImageProcessorPil

    tokenizer = clip_tokenizer(out)
    make_clip(spec, tokenizer).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    size = spec.clip_image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
