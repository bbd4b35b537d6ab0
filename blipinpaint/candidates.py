"""Caption candidates as rows, and the best of them by the real L_BLIP.

For `finetune.method=reward_ranked` each training image gets `caption.candidates`
captions (`captioning.candidate_captions`: the greedy one first), each inpainted and
scored like generate's caption. A candidate is a row of its own, id `<image id>#<k>`, so
that the exactly-once writer accounts for every (image, candidate) pair, and a rerun
does the pairs that are missing, whatever part boundaries a killed run left.
"""

from __future__ import annotations

import numpy as np
import torch

from blipinpaint import fingerprint
from blipinpaint.batches import Batch
from blipinpaint.captioning import candidate_captions, visible_embeddings
from blipinpaint.commit_log import CommitLog
from blipinpaint.config import Config
from blipinpaint.errors import ConfigError
from blipinpaint.layout import RunLayout
from blipinpaint.losses import LossWeights, blip_losses
from blipinpaint.models import CaptionerModel
from blipinpaint.reader import read_candidates
from blipinpaint.storage import is_dir, is_file

PENDING = "pending_candidates"  # the candidates still to do of each image, as "0,1,3"


def candidate_id(image_id: str, k: int) -> str:
    return f"{image_id}#{k}"


def pending_text(ks: list[int]) -> str:
    # A string, not a list: Ray Data turns equal-length lists into a 2-d tensor column and
    # ragged ones into object arrays; a string arrives as it left.
    return ",".join(str(k) for k in ks)


def expand(batch: Batch) -> tuple[Batch, list[tuple[int, int]]]:
    """One row per pending candidate of each image (`PENDING`), with `id` `<image id>#<k>`,
    `image_id` and `candidate`; and the (image row, k) of each new row.

    A row's other columns are repeated; its per-row stage seconds are shared out over its
    copies and its retry counts kept on the first, so the writer's sums stay true."""
    pairs = [(row, int(k)) for row, ks in enumerate(batch[PENDING]) for k in str(ks).split(",") if k != ""]
    index = np.array([row for row, _ in pairs], dtype=np.int64)
    copies = np.bincount(index, minlength=len(batch["id"]))
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = index[1:] != index[:-1]
    out = {}
    for key, values in batch.items():
        if key == PENDING:
            continue
        values = np.asarray(values)[index]
        if key.startswith("seconds_"):
            values = values / copies[index]
        elif key.startswith("retries_"):
            values = np.where(first, values, 0)
        out[key] = values
    image_ids = [str(batch["id"][row]) for row, _ in pairs]
    out["id"] = np.array([candidate_id(i, k) for i, (_, k) in zip(image_ids, pairs)], dtype=object)
    out["image_id"] = np.array(image_ids, dtype=object)
    out["candidate"] = np.array([k for _, k in pairs], dtype=np.int32)
    return out, pairs


class CandidateCaptioner:
    """Stage: `image`, `mask`, `id`, `PENDING` -> a row per pending candidate of each image
    (`expand`), its `caption` the image's candidate k (`candidate_captions`, seeded per
    image id: an image's candidates are the same in any batch and on any rerun, so a rerun
    that does only some of them does the ones it lacks)."""

    def __init__(self, captioner: CaptionerModel, candidates: int, seed: int, max_new_tokens: int = 30,
                 num_beams: int = 1):
        self.bundle, self.candidates, self.seed = captioner, candidates, seed
        self.decoding = dict(max_new_tokens=max_new_tokens, num_beams=num_beams)

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> Batch:
        embeds = visible_embeddings(self.bundle, batch["image"], batch["mask"])
        ids = [str(i) for i in batch["id"]]
        captions = candidate_captions(self.bundle, embeds, ids, self.seed, self.candidates, **self.decoding)
        if "caption" in batch:  # candidate 0 as generate gave it (half precision may decode it otherwise here)
            for group, caption in zip(captions, batch["caption"]):
                group[0] = str(caption)
        out, pairs = expand(batch)
        out["caption"] = np.array([captions[row][k] for row, k in pairs], dtype=object)
        return out


class SharedNoise:
    """Stage: runs the inpainter `stage` with each candidate row's `image_id` as its id: the
    inpainter seeds its noise by id, and every candidate of an image must start from that
    image's noise (the seed generate inpainted it from), so that only the caption differs."""

    def __init__(self, stage):
        self.stage = stage

    def __call__(self, batch: Batch) -> Batch:
        out = self.stage({**batch, "id": batch["image_id"]})
        return {**out, "id": batch["id"]}


def best_candidates(rows: dict[str, np.ndarray], weights: LossWeights,
                    caption_max_mask_area: float | None = None) -> dict[str, dict]:
    """Per image (`image_id`), the candidate row with the lowest L_BLIP of its real metrics
    (`ssim`, `psnr`, `clip_score`); the lowest candidate index among equals. {image_id:
    {"candidate", "caption", "loss", "greedy_loss" (candidate 0's, None if it has no row),
    "candidates" (how many of its candidates have a row)}}.

    A NaN loss ranks last; an infinite PSNR (a hole restored exactly) first. An image whose
    mask hides more than `caption_max_mask_area` (`mask_area` column) was inpainted without
    text whatever its caption: its candidates differ only in CLIP score, against images they
    did not guide, so the first (greedy) one stands."""
    def column(name):
        return torch.as_tensor(np.asarray(rows[name], dtype=np.float64))

    losses = blip_losses(column("ssim"), column("psnr"), column("clip_score"), weights).numpy()
    losses = np.where(np.isnan(losses), np.inf, losses)
    groups: dict[str, list[int]] = {}
    for j, image_id in enumerate(rows["image_id"]):
        groups.setdefault(str(image_id), []).append(j)
    best = {}
    for image_id, js in groups.items():
        js = sorted(js, key=lambda j: int(rows["candidate"][j]))
        uncaptioned = caption_max_mask_area is not None and float(rows["mask_area"][js[0]]) > caption_max_mask_area
        j = js[0] if uncaptioned else js[int(np.argmin(losses[js]))]  # argmin: the first of equal minima
        greedy = [i for i in js if int(rows["candidate"][i]) == 0]
        best[image_id] = {"candidate": int(rows["candidate"][j]), "caption": str(rows["caption"][j]),
                          "loss": float(losses[j]), "greedy_loss": float(losses[greedy[0]]) if greedy else None,
                          "candidates": len(js)}
    return best


def best_captions(cfg: Config, train_ids: list[str], weights: LossWeights) -> dict[str, dict] | None:
    """Each training image's best candidate by the real L_BLIP (`weights`) of the candidates
    job's rows, of the images with candidate rows; None where the run has no `candidates/`
    (method `scorer`).

    reward_ranked trains on them: their rows must come from this run's settings (the number
    of candidates included) and every candidate of every training image be accounted for.
    The scorer method only measures against them: the same generate settings suffice."""
    candidates_dir = RunLayout(cfg.run_dir).candidates
    reward_ranked = cfg.finetune.method == "reward_ranked"
    if not is_dir(candidates_dir):
        if reward_ranked:
            raise ConfigError(f"{candidates_dir} is missing: run rayjobs.candidates first")
        return None
    fingerprint.check(candidates_dir, fingerprint.candidates(cfg) if reward_ranked else fingerprint.generate(cfg),
                      record=False)
    if reward_ranked:
        if not is_file(candidates_dir.success):  # a killed run's parts may still be staged
            raise ConfigError(f"{candidates_dir} is not complete: run rayjobs.candidates (again) first")
        done, per_image = CommitLog(candidates_dir).committed_ids(), cfg.caption.candidates
        missing = [i for i in train_ids if any(candidate_id(i, k) not in done for k in range(per_image))]
        if missing:
            raise ConfigError(f"{candidates_dir}: {len(missing)} of {len(train_ids)} training images lack some of "
                              f"their {per_image} candidates: run rayjobs.candidates (again) first")
    return best_candidates(read_candidates(candidates_dir, set(train_ids)), weights, cfg.inpaint.caption_max_mask_area)
