"""What a step's output depends on, and the check that refuses to mix outputs of other settings.

A folder of committed rows records the settings its rows were made under
(`fingerprint.json`) when its first run starts; a later run with other values for any of
them is refused with one line naming the keys, so rows of two settings never mix.
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from blipinpaint.config import Config
from blipinpaint.errors import ConfigError
from blipinpaint.layout import Folder
from blipinpaint.storage import is_file, read_text, write_text

# Generate's rows: the sections whose change makes earlier rows incomparable with new ones.
GENERATE_KEYS = ("seed", "models.preset", "models.device", "models.dtype", "models.captioner", "models.inpainter",
                 "models.clip", "masks", "caption", "inpaint", "data.image_size", "data.min_side",
                 "data.max_aspect_ratio", "data.max_file_mb", "scorer.feature_layer")


def settings(cfg: Config, keys: tuple[str, ...]) -> dict:
    """The values of the dotted `keys` in `cfg`, as plain containers."""
    conf = OmegaConf.to_container(OmegaConf.structured(cfg))
    out = {}
    for key in keys:
        value = conf
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def generate(cfg: Config) -> dict:
    """The settings a generated row depends on."""
    out = settings(cfg, GENERATE_KEYS)
    # Candidates change evaluate's and the candidate stream's rows, not these (`candidates`).
    out["caption"].pop("candidates", None)
    if out["inpaint"].get("caption_max_mask_area") is None:
        out["inpaint"].pop("caption_max_mask_area", None)  # at its default the key is left out
    return out


def candidates(cfg: Config) -> dict:
    """`generate`'s, and the number of caption candidates (None at 1, so a folder made with
    candidates refuses a run without them, and the other way round)."""
    n = cfg.caption.candidates
    return {**generate(cfg), "caption.candidates": n if n > 1 else None}


def evaluate(cfg: Config, finetuned_decoder: str | None, reranking_scorer: str | None) -> dict:
    """`candidates`', and the digests of the fine-tuned decoder and of the scorer that
    reranks captions (None without candidates): rows of another model never mix."""
    return {**candidates(cfg), "finetuned_decoder": finetuned_decoder, "reranking_scorer": reranking_scorer}


def check(out_dir: str, current: dict, record: bool = True) -> None:
    """Refuse to mix rows made under other settings (`current`) in `out_dir`; a folder
    without a fingerprint yet records `current` (unless `record` is False: a reader's check)."""
    path = Folder(out_dir).fingerprint
    if is_file(path):
        previous = json.loads(read_text(path))
        changed = sorted(k for k in current if previous.get(k) != current[k])
        if changed:
            raise ConfigError(
                f"{out_dir} holds rows generated with other settings ({', '.join(changed)} differ); "
                "use another run_dir, or restore those settings to resume"
            )
        return
    if record:
        write_text(path, json.dumps(current, indent=2))
