"""What each step's output depends on, and the check that refuses to mix or reuse other outputs.

A step's fingerprint is the settings its output depends on and the content digests of what
it reads (models, the previous steps' committed rows, the scorer, the fine-tuned BLIP).
A step claims its folder with it (`fingerprint.json`) and ends by writing it to `_SUCCESS`.
A run that finds another fingerprint refuses with one line naming the keys, or, with the
step (or one it depends on) in `restart`, moves the old output aside and starts it afresh.
The pipeline skips a step only when its `_SUCCESS` holds the fingerprint asked for.
"""

from __future__ import annotations

import hashlib
import json
import time

from omegaconf import OmegaConf

from blipinpaint.commit_log import CommitLog
from blipinpaint.config import Config
from blipinpaint.errors import ConfigError
from blipinpaint.layout import STEPS, Folder, RunLayout
from blipinpaint.storage import delete, folder_digest, is_dir, is_file, move_aside, read_text, write_text

# The steps each step reads (`layout.STEPS` names them, as `restart` does).
DEPENDS = {"generate": (), "candidates": ("generate",), "scorer": ("generate",),
           "finetune": ("generate", "scorer", "candidates"), "eval": ("generate", "scorer", "finetune", "candidates"),
           "export": ("generate",)}
assert tuple(DEPENDS) == STEPS
# Generate's rows: the settings whose change makes earlier rows incomparable with new ones.
GENERATE_KEYS = ("seed", "models.preset", "models.device", "models.dtype", "models.captioner", "models.inpainter",
                 "models.clip", "masks", "caption", "inpaint", "data.image_size", "data.min_side",
                 "data.max_aspect_ratio", "data.max_file_mb", "data.max_image_mp", "scorer.feature_layer")
# What a training job's numbers depend on besides its own section (not its pools or retries).
TRAINING_KEYS = ("seed", "models.device", "train.num_workers", "train.zero_stage", "train.offload_optimizer",
                 "train.val_fraction", "train.use_gpu")
# The report's settings: evaluate's section but its pools and its retries.
REPORT_KEYS = ("evaluate.limit", "evaluate.mask_buckets", "evaluate.grid_rows", "evaluate.gallery_limit",
               "evaluate.other_runs", "evaluate.bootstrap")


def settings(cfg: Config, keys: tuple[str, ...]) -> dict:
    """The values of the dotted `keys` in `cfg`, a section's by its own dotted keys, so that a
    refusal names the very setting that differs."""
    conf = OmegaConf.to_container(OmegaConf.structured(cfg))
    out = {}

    def put(key: str, value) -> None:
        if isinstance(value, dict):
            for name, inner in value.items():
                put(f"{key}.{name}", inner)
        else:
            out[key] = value

    for key in keys:
        value = conf
        for part in key.split("."):
            value = value[part]
        put(key, value)
    return out


def digest_of(value) -> str:
    """A digest of a fingerprint (or any JSON value), for another step's record of it."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _recorded(folder: Folder) -> str | None:
    """The digest of the fingerprint a step folder recorded, or None."""
    return digest_of(json.loads(read_text(folder.fingerprint))) if is_file(folder.fingerprint) else None


def _rows(folder: Folder) -> dict:
    """A stream step's output as a later step reads it: its fingerprint and its committed rows
    (each part's name and ids, from its marker: a part's name is the digest of its ids, and
    its files are written once)."""
    parts = [[m["name"], m["samples"], m["errors"]] for m in CommitLog(folder).markers()]
    return {"fingerprint": _recorded(folder), "rows": digest_of(parts)}


def _model_digests(cfg: Config, roles: tuple[str, ...]) -> dict[str, str]:
    # Imported here: the builders import torch, and every task that reads committed rows
    # imports this module (through `reader`) without needing them.
    from blipinpaint.builders import model_digests

    return model_digests(cfg, roles)


def generate_settings(cfg: Config) -> dict:
    """The settings part of `generate`'s fingerprint (no model is hashed)."""
    out = settings(cfg, GENERATE_KEYS)
    # Candidates change evaluate's and the candidate stream's rows, not these (`candidates`).
    del out["caption.candidates"]
    # A compiled UNet rounds differently (`acceleration.compile_unet`: beyond the tolerance
    # between eager runs in half precision), so its mode is recorded; eager is recorded as
    # nothing, as before the setting existed, so that runs made then still resume.
    if out["inpaint.compile"] == "off":
        del out["inpaint.compile"]
    return out


def generate(cfg: Config) -> dict:
    """What a generated row depends on: its settings and the bytes of the three models."""
    return {**generate_settings(cfg), "model_digests": _model_digests(cfg, ("captioner", "inpainter", "clip"))}


def candidates(cfg: Config, generated: dict | None = None) -> dict:
    """`generate`'s (`generated`, when the caller has it), and the number of caption candidates
    (None at 1, so a folder made with candidates refuses a run without them, and the other
    way round)."""
    n = cfg.caption.candidates
    return {**(generated or generate(cfg)), "caption.candidates": n if n > 1 else None}


def scorer(cfg: Config) -> dict:
    """The scorer's settings and generate's rows it trains on."""
    return {**settings(cfg, ("scorer", *TRAINING_KEYS)), "generate": _rows(RunLayout(cfg.run_dir).generate)}


def finetune(cfg: Config) -> dict:
    """The fine-tune's settings, the captioner it starts from, generate's rows, the scorer it
    follows (method `scorer`) or the candidates it learns (`reward_ranked`; the scorer method
    only measures against them, in its report)."""
    run = RunLayout(cfg.run_dir)
    keys = ("finetune", "caption.max_new_tokens", "caption.num_beams", "caption.decoder_dtype",
            "inpaint.caption_max_mask_area", "scorer.feature_layer", "models.dtype", *TRAINING_KEYS)
    uses_scorer = cfg.finetune.method == "scorer"
    return {**settings(cfg, keys), "generate": _rows(run.generate),
            "captioner": _model_digests(cfg, ("captioner",))["captioner"],
            "scorer": folder_digest(run.scorer_model) if uses_scorer and is_dir(run.scorer_model) else None,
            "candidates": None if uses_scorer else _rows(run.candidates)}


def evaluate(cfg: Config, generated: dict | None = None) -> dict:
    """What an evaluated row depends on: `candidates`', the fine-tuned BLIP and, with
    candidates, the scorer that reranks them."""
    run = RunLayout(cfg.run_dir)
    reranking = cfg.caption.candidates > 1 and is_dir(run.scorer_model)
    return {**candidates(cfg, generated), "finetuned_decoder": folder_digest(run.blip) if is_dir(run.blip) else None,
            "reranking_scorer": folder_digest(run.scorer_model) if reranking else None}


def report(cfg: Config, rows: dict | None = None) -> dict:
    """What evaluate's report depends on: its rows' (`rows`, when the caller has them), its
    settings, the FID network, the evaluation set (generate's rows) and the other runs it joins."""
    run = RunLayout(cfg.run_dir)
    others = {other: (digest_of(read_text(RunLayout(other).eval.report))
                      if is_file(RunLayout(other).eval.report) else None) for other in cfg.evaluate.other_runs}
    return {**(rows or evaluate(cfg)), **settings(cfg, REPORT_KEYS), "generate": _rows(run.generate),
            "fid": _model_digests(cfg, ("fid",))["fid"], "other_runs": others}


def export(cfg: Config, heldout_fraction: float) -> dict:
    """What an export's files depend on: generate's rows and the fingerprint they were made
    under, the held-out split (the seed and the fraction it came to), the export's settings
    (not where it writes, nor its resources)."""
    return {**settings(cfg, ("seed", "export.formats", "export.rows_per_shard")),
            "heldout_fraction": heldout_fraction, "generate": _rows(RunLayout(cfg.run_dir).generate)}


def differing(previous: dict, current: dict) -> list[str]:
    return sorted(k for k in current.keys() | previous.keys() if previous.get(k) != current.get(k))


def restarting(cfg: Config, step: str) -> bool:
    """Whether `restart` names `step` or a step it reads (directly or through another)."""
    return step in cfg.restart or any(restarting(cfg, before) for before in DEPENDS[step])


def check(out_dir: str, current: dict, record: bool = True) -> None:
    """Refuse to read or add to `out_dir` if it was made under other settings (`current`);
    a folder without a fingerprint yet records `current` (unless `record` is False: a reader's check)."""
    path = Folder(out_dir).fingerprint
    if is_file(path):
        previous = json.loads(read_text(path))
        changed = [k for k in current if previous.get(k) != current[k]]
        if changed:
            raise ConfigError(f"{out_dir} holds rows generated with other settings ({', '.join(sorted(changed))} "
                              "differ); use another run_dir, or restore those settings to resume")
        return
    if record:
        write_text(path, json.dumps(current, indent=2))


def claim(cfg: Config, step: str, folders: tuple[Folder, ...], current: dict) -> list[str]:
    """Make `folders` (the first holds the fingerprint) the output of `current`, before the
    step writes anything. A folder of the same fingerprint is resumed (or left as it is when
    done). One of another, or one holding output of unknown origin, is refused with a line
    naming the keys, unless `restart` names the step or a step it reads: then the old output
    is moved aside under a dated name, never deleted, and the step starts afresh. Returns
    where old outputs went."""
    path = folders[0].fingerprint
    if is_file(path):
        changed = differing(json.loads(read_text(path)), current)
        reason = f"{', '.join(changed)} differ"
    else:  # nothing here yet, or output written before fingerprints: of unknown origin
        changed = sorted(current) if any(is_dir(f) for f in folders) else []
        reason = "it has no fingerprint.json"
    moved = []
    if changed:
        if not restarting(cfg, step):
            raise ConfigError(
                f"{folders[0]} holds the {step} step's output of other settings or inputs ({reason}): "
                f"restart=[{step}] moves it aside and redoes it (and what reads it); or use another run_dir, or "
                "restore those settings to resume")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved = [m for m in (move_aside(f, f"replaced-{stamp}") for f in folders) if m]
    if changed or not is_file(path):
        write_text(path, json.dumps(current, indent=2))
    delete(folders[0].success)  # until this run finishes: a run cut short must not look done
    return moved


def done(folder: Folder, current: dict) -> bool:
    """Whether the step that writes `folder` finished with the fingerprint `current`."""
    return is_file(folder.success) and not differing(json.loads(read_text(folder.success) or "{}"), current)


def finish(folder: Folder, current: dict) -> None:
    """The step's last write: `_SUCCESS`, holding the fingerprint it finished under."""
    write_text(folder.success, json.dumps(current, indent=2))
