"""The objectives BLIP's text decoder is fine-tuned with, as callables the training loop calls.

Each takes a batch's caption tokens, image embeddings, decoder features and logits and
returns the loss and its figures for the log: the paper's L_BLIP on the frozen scorer's
predictions, reward_ranked's language-model loss on each image's best candidate, and the
KL term to the original decoder that keeps captions fluent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from blipinpaint.captioning import caption_token_mask
from blipinpaint.losses import LossWeights, blip_loss, caption_kl, caption_lm_loss
from blipinpaint.scorer import ScoreNet

# (caption ids, image embeddings, decoder features, logits) -> (loss, figures for the log)
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


def scorer_loss(scorer: ScoreNet, weights: LossWeights) -> Loss:
    """L_BLIP on the frozen scorer's predictions from the caption features (the paper's)."""
    def loss(ids, embeds, features, logits):
        ssim, psnr, clip = scorer.destandardize(scorer(features.float())).unbind(dim=1)
        value = blip_loss(ssim, psnr, clip, weights)
        return value, {"loss_blip": value.item(), "pred_ssim": ssim.mean().item(),
                       "pred_psnr": psnr.mean().item(), "pred_clip": clip.mean().item()}
    return loss


def lm_loss(model) -> Loss:
    """reward_ranked's: each image's `caption` is its best candidate, and the decoder learns to say it."""
    def loss(ids, embeds, features, logits):
        value = caption_lm_loss(logits, ids, caption_token_mask(model, ids))
        return value, {"loss_lm": value.item()}
    return loss


def with_kl(loss: Loss, model, reference: torch.nn.Module, kl_weight: float) -> Loss:
    """`loss` + `kl_weight` · KL(original decoder ‖ fine-tuned) over the caption's tokens."""
    pad = model.config.text_config.pad_token_id

    def loss_and_kl(ids, embeds, features, logits):
        value, figures = loss(ids, embeds, features, logits)
        with torch.no_grad():
            ref_logits = reference(input_ids=ids, attention_mask=(ids != pad).long(),
                                   encoder_hidden_states=embeds, return_dict=True).logits
        kl = caption_kl(logits, ref_logits, caption_token_mask(model, ids))
        return value + kl_weight * kl, {**figures, "kl": kl.item()}
    return loss_and_kl
