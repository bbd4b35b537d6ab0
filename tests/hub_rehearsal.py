"""A local Hugging Face cache laid out like the `paper` preset's repos at their pinned commits.

`tests/data/hub/<org>--<name>/listing.json` holds each revision's real file listing (where
it was read is in the file) and `files/` the real config, tokenizer and processor files.
The cache built here has the same names, subfolders and formats (pickle `.bin`,
`.safetensors`, `fp16` variants) and those real files, with tiny random weights in place of
the real tensors: the size fields of the configs shrink, nothing else changes. Files the
rehearsal cannot make in their real format (TensorFlow, Flax, the single-file `.ckpt`, the
safety checker) are in the commit's tree listing but not in the cache, as after a partial
download: a job that asked for one would fail here, offline.

huggingface_hub reads it as a cache it filled itself: `blobs/` named by the hub's id of
each file (sha256 for LFS files, the git blob sha1 otherwise), `snapshots/<commit>/` links,
`refs/main`, and the tree listing of the commit in `trees/<commit>.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from blipinpaint.models.vocab import CAPTION_WORDS, write_clip_bpe

DATA = Path(__file__).parent / "data" / "hub"
REPOS = ("Salesforce--blip-image-captioning-base", "stable-diffusion-v1-5--stable-diffusion-inpainting",
         "openai--clip-vit-large-patch14")

# The size fields of each real config, shrunk; every other field stays as the hub has it.
TINY_BLIP_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                      max_position_embeddings=64)
TINY_BLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)
TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)
TINY_UNET = dict(block_out_channels=[32, 64], cross_attention_dim=32,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
TINY_VAE = dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=64,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
TINY_IMAGE_SIZE = 32  # BLIP's and CLIP's processors resize to their vision tower's input

# Not makeable in their real format here: listed in the tree, absent from the cache.
NOT_CACHED = (".h5", ".msgpack", ".ckpt")


def listing(repo: str) -> dict:
    return json.loads((DATA / repo / "listing.json").read_text())


def real_json(repo: str, path: str) -> dict:
    return json.loads((DATA / repo / "files" / path).read_text())


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def _pickle(state: dict[str, torch.Tensor]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, f"{tmp}/w.bin")
        return Path(f"{tmp}/w.bin").read_bytes()


def _safetensors(state: dict[str, torch.Tensor]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous().clone() for k, v in state.items()}, f"{tmp}/w.safetensors",
                  metadata={"format": "pt"})
        return Path(f"{tmp}/w.safetensors").read_bytes()


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def _saved(tokenizer, name: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return (Path(tmp) / name).read_bytes()


def blip_files() -> dict[str, bytes]:
    repo = REPOS[0]
    # BERT's layout: [PAD] 0, unused ids, then [UNK] [CLS] [SEP] [MASK]; no [DEC] in the
    # vocabulary: BLIP's decoder-start id is the one after it (30522 of 30524 in the real one).
    words = CAPTION_WORDS
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = list(dict.fromkeys(["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                *letters, *(f"##{c}" for c in letters), *words]))
    vocab_txt = ("\n".join(vocab) + "\n").encode()
    config = real_json(repo, "config.json")
    config["text_config"].update(TINY_BLIP_TEXT, vocab_size=len(vocab) + 2, bos_token_id=len(vocab),
                                 sep_token_id=vocab.index("[SEP]"))
    config["vision_config"].update(TINY_BLIP_VISION)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig.from_dict(config))
    processor = real_json(repo, "preprocessor_config.json") | {"size": TINY_IMAGE_SIZE}
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=512)
    return {
        "config.json": _json(config),
        "preprocessor_config.json": _json(processor),
        "special_tokens_map.json": (DATA / repo / "files" / "special_tokens_map.json").read_bytes(),
        "tokenizer_config.json": (DATA / repo / "files" / "tokenizer_config.json").read_bytes(),
        "tokenizer.json": _saved(tokenizer, "tokenizer.json"),
        "vocab.txt": vocab_txt,
        # The only weights at this revision, as transformers 4.26 saved them.
        "pytorch_model.bin": _pickle(with_position_ids(model.state_dict(), **{"text_decoder.bert": 64})),
        "README.md": b"# BLIP: image captioning (base)\n",
        ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.h5 filter=lfs diff=lfs merge=lfs -text\n",
    }


CLIP_VOCAB_SIZE = 49408  # <|startoftext|> 49406 and <|endoftext|> 49407, as CLIP's configs assume


def clip_bpe() -> tuple[bytes, bytes, CLIPTokenizer]:
    """The offline byte-level BPE, padded with unused tokens to CLIP's vocabulary size so that
    its special tokens get the ids the real checkpoints' configs and pooling rely on."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges = write_clip_bpe(Path(tmp))
        tokens = list(json.loads(vocab_path.read_text()))
        words, specials = tokens[:-2], tokens[-2:]
        padded = words + [f"<|unused{i}|>" for i in range(CLIP_VOCAB_SIZE - len(tokens))] + specials
        vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(padded)}))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
        return vocab_path.read_bytes(), merges.read_bytes(), tokenizer


def with_position_ids(state: dict[str, torch.Tensor], **lengths: int) -> dict[str, torch.Tensor]:
    """Checkpoints saved by transformers < 4.31 hold the `position_ids` buffers (int64, (1, n))."""
    return state | {f"{prefix}.embeddings.position_ids": torch.arange(n)[None] for prefix, n in lengths.items()}


def legacy_vae_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x's VAE files name the mid-block attention `query/key/value/proj_attn` (diffusers < 0.14)."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new, legacy in old.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.") if "mid_block" in key else key
        renamed[key] = value
    return renamed


def sd_files() -> dict[str, bytes]:
    repo = REPOS[1]
    vocab, merges, tokenizer = clip_bpe()
    unet_config = real_json(repo, "unet/config.json") | TINY_UNET
    vae_config = real_json(repo, "vae/config.json") | TINY_VAE
    text_config = real_json(repo, "text_encoder/config.json") | TINY_CLIP_TEXT | {"projection_dim": 32}
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_config).state_dict()
    vae = legacy_vae_names(AutoencoderKL.from_config(vae_config).state_dict())
    text = with_position_ids(CLIPTextModel(CLIPTextConfig.from_dict(text_config)).state_dict(), text_model=77)
    files = {path: (DATA / repo / "files" / path).read_bytes()
             for path in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/special_tokens_map.json",
                          "tokenizer/tokenizer_config.json", "feature_extractor/preprocessor_config.json")}
    files |= {"unet/config.json": _json(unet_config), "vae/config.json": _json(vae_config),
              "text_encoder/config.json": _json(text_config), "config.json": _json(unet_config),
              "tokenizer/vocab.json": vocab, "tokenizer/merges.txt": merges,
              "README.md": b"# Stable Diffusion Inpainting\n",
              ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs -text\n"}
    # Full precision only as pickles; the fp16 weights as pickles and as safetensors.
    for folder, state, stem in (("unet", unet, "diffusion_pytorch_model"), ("vae", vae, "diffusion_pytorch_model"),
                                ("text_encoder", text, None)):
        pickle_stem = stem or "pytorch_model"
        files[f"{folder}/{pickle_stem}.bin"] = _pickle(state)
        files[f"{folder}/{pickle_stem}.fp16.bin"] = _pickle(_half(state))
        files[f"{folder}/{stem or 'model'}.fp16.safetensors"] = _safetensors(_half(state))
    return files


def clip_files() -> dict[str, bytes]:
    repo = REPOS[2]
    vocab, merges, tokenizer = clip_bpe()
    config = real_json(repo, "config.json")
    # transformers builds each tower from its `*_config_dict` when present: the tiny sizes go in both.
    for key, tiny in (("text_config", TINY_CLIP_TEXT), ("vision_config", TINY_CLIP_VISION)):
        config[key].update(tiny, projection_dim=32)
        config[f"{key}_dict"].update(tiny, projection_dim=32)
    config["projection_dim"] = 32
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig.from_dict(config))
    patches = (TINY_CLIP_VISION["image_size"] // TINY_CLIP_VISION["patch_size"]) ** 2
    state = with_position_ids(model.state_dict(), text_model=77, vision_model=patches + 1)
    processor = real_json(repo, "preprocessor_config.json") | {"size": TINY_IMAGE_SIZE, "crop_size": TINY_IMAGE_SIZE}
    return {
        "config.json": _json(config), "preprocessor_config.json": _json(processor),
        "special_tokens_map.json": (DATA / repo / "files" / "special_tokens_map.json").read_bytes(),
        "tokenizer_config.json": (DATA / repo / "files" / "tokenizer_config.json").read_bytes(),
        "tokenizer.json": _saved(tokenizer, "tokenizer.json"), "vocab.json": vocab, "merges.txt": merges,
        "model.safetensors": _safetensors(state), "pytorch_model.bin": _pickle(state),
        "README.md": b"# CLIP ViT-L/14\n",
        ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs -text\n",
    }


def hub_id(content: bytes, lfs: bool) -> str:
    """The id the hub serves as a file's ETag: sha256 for LFS files, else the git blob sha1."""
    if lfs:
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lay_out(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """One repo in the hub cache's layout; returns its snapshot folder."""
    real = listing(repo)
    extra = set(files) - set(real["files"])
    assert not extra, f"{repo}: files the real revision does not have: {sorted(extra)}"
    storage = cache / f"models--{repo}"
    commit = real["revision"]
    tree = {}
    for path, info in real["files"].items():
        content = files.get(path)
        if content is None:
            assert path.endswith(NOT_CACHED) or path.startswith("safety_checker/"), f"{repo}: no content for {path}"
            # In the listing only: placeholder ids, never fetched.
            tree[path] = {"size": info["size"] or 0, "blob_id": "0" * 40}
            if info["lfs"]:
                tree[path] |= {"lfs_sha256": info["sha256"] or "0" * 64, "lfs_size": info["size"] or 0}
            continue
        etag = hub_id(content, info["lfs"])
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = storage / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        tree[path] = {"size": len(content), "blob_id": hub_id(content, False)}
        if info["lfs"]:
            tree[path] |= {"lfs_sha256": etag, "lfs_size": len(content)}
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    (storage / "trees").mkdir(parents=True, exist_ok=True)
    (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}, indent=1))
    return storage / "snapshots" / commit


def build_hub_cache(cache: Path) -> dict[str, Path]:
    """The three repos of the `paper` preset under `cache` (a `HF_HUB_CACHE`): {repo: snapshot folder}."""
    return {repo: lay_out(cache, repo, build()) for repo, build in zip(REPOS, (blip_files, sd_files, clip_files))}
