"""The paper's fine-tuning loss, on the scorer's predictions in metric units.

    L_BLIP = λ1·(1 − SSIM) − λ2·PSNR − λ3·CLIP,   λ1 = 0.5, λ2 = 0.2, λ3 = 4

Lower is better: high predicted SSIM, PSNR and CLIP score all reduce it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    ssim: float = 0.5  # λ1
    psnr: float = 0.2  # λ2
    clip: float = 4.0  # λ3


def blip_losses(ssim: torch.Tensor, psnr: torch.Tensor, clip: torch.Tensor, weights: LossWeights) -> torch.Tensor:
    """λ1·(1 − SSIM) − λ2·PSNR − λ3·CLIP per sample (to rank captions by)."""
    return weights.ssim * (1 - ssim) - weights.psnr * psnr - weights.clip * clip


def blip_loss(ssim: torch.Tensor, psnr: torch.Tensor, clip: torch.Tensor, weights: LossWeights) -> torch.Tensor:
    """Mean over the batch of λ1·(1 − SSIM) − λ2·PSNR − λ3·CLIP."""
    return blip_losses(ssim, psnr, clip, weights).mean()


def caption_kl(logits: torch.Tensor, reference_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ fine-tuned) of next-token distributions over the caption's tokens.

    Keeps the fine-tuned decoder's language close to the original's, so captions stay
    fluent while the scorer pulls them towards better inpaintings.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(reference_logits.float(), dim=-1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    weights = tokens.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)


def caption_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The language-model loss of a teacher-forced caption: mean next-token cross-entropy
    over the caption's tokens (`tokens`, 1 on its words and closing [SEP]), the logits at
    position t predicting token t + 1.

    Reward-ranked fine-tuning trains on it: the decoder learns to give the best candidate."""
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    weights = tokens[:, 1:].to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)
