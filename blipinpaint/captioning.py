"""BLIP captions of the visible background, and the caption features the scorer learns from.

The captioner only ever receives the masked image (hidden pixels replaced by gray), so a
caption cannot leak what the inpainter is asked to reconstruct.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from blipinpaint.losses import LossWeights, blip_losses
from blipinpaint.masks import masked_pixels
from blipinpaint.models import CaptionerModel
from blipinpaint.seeds import sample_seed

if TYPE_CHECKING:
    from transformers import BlipForConditionalGeneration

    from blipinpaint.scorer import ScoreNet

# How candidate captions are drawn: nucleus sampling, as BLIP's authors sample captions
# (CapFilt): varied, but from the head of the distribution, so they stay fluent.
SAMPLING = {"do_sample": True, "top_p": 0.9}


def encode_images(model: BlipForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    return model.vision_model(pixel_values=pixel_values).last_hidden_state


def weights_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's floating-point weights (a DeepSpeed engine's: its module's)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def generate_captions(
    model: BlipForConditionalGeneration, image_embeds: torch.Tensor, decoder: torch.nn.Module | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """Token ids ([DEC] caption... [SEP] [PAD]...) from precomputed image embeddings.

    Same decoding as `BlipForConditionalGeneration.generate`, but reusing the vision
    pass that the feature computation needs as well (the ViT is most of BLIP's cost).
    `decoder`: another text decoder than the model's own (e.g. a copy in another precision).
    The embeddings enter the decoder in its own dtype (`caption.decoder_dtype` may differ
    from the vision encoder's `models.dtype`).
    """
    decoder = decoder or model.text_decoder
    text_config = model.config.text_config
    start = torch.full((image_embeds.shape[0], 1), text_config.bos_token_id, device=image_embeds.device)
    return decoder.generate(
        input_ids=start,
        eos_token_id=text_config.sep_token_id,
        pad_token_id=text_config.pad_token_id,
        encoder_hidden_states=image_embeds.to(weights_dtype(decoder)),
        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
        **generate_kwargs,
    )


def visible_embeddings(bundle: CaptionerModel, images: np.ndarray, masks: np.ndarray) -> torch.Tensor:
    """The vision encoder's states of the masked images (the hole gray: never seen)."""
    pixels = bundle.image_processor(images=list(masked_pixels(images, masks)), return_tensors="pt").pixel_values
    vision = bundle.model.vision_model
    return encode_images(bundle.model, pixels.to(bundle.model.device, weights_dtype(vision)))


def caption_texts(tokenizer, ids: torch.Tensor) -> list[str]:
    """Generated token ids as caption strings: special tokens dropped, whitespace stripped."""
    return [c.strip() for c in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def caption_token_mask(model: BlipForConditionalGeneration, input_ids: torch.Tensor) -> torch.Tensor:
    """1 over the caption's tokens (its words and closing [SEP]), 0 on [DEC] and padding."""
    text_config = model.config.text_config
    return (input_ids != text_config.pad_token_id) & (input_ids != text_config.bos_token_id)


def decode_caption(
    model: BlipForConditionalGeneration, image_embeds: torch.Tensor, input_ids: torch.Tensor,
    decoder: torch.nn.Module | None = None, layer: int = -2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-force a caption through the text decoder: (caption features, next-token logits).

    The features mean-pool the output of transformer layer `layer` (`scorer.feature_layer`:
    -1 the last layer, -2 the second-to-last, the default) over the caption's tokens.
    Differentiable in the decoder's parameters: fine-tuning backpropagates the scorer's loss
    through here, passing the decoder as wrapped for training (`decoder`, e.g. a DeepSpeed
    engine) instead of `model.text_decoder`.
    """
    layers = model.config.text_config.num_hidden_layers
    if not (-layers <= layer <= -1 or 1 <= layer <= layers):
        raise ValueError(f"scorer.feature_layer={layer}: the text decoder has {layers} layers "
                         f"(-1 is the last, -{layers} the first; or 1..{layers})")
    tokens = caption_token_mask(model, input_ids)
    decoder = decoder or model.text_decoder
    out = decoder(
        input_ids=input_ids,
        attention_mask=(input_ids != model.config.text_config.pad_token_id).long(),
        encoder_hidden_states=image_embeds.to(weights_dtype(decoder)),
        output_hidden_states=True,
        return_dict=True,
    )
    hidden = out.hidden_states[layer]  # [0] is the embeddings, [k] layer k's output
    weights = tokens.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1), out.logits


def caption_features(
    model: BlipForConditionalGeneration, image_embeds: torch.Tensor, input_ids: torch.Tensor,
    decoder: torch.nn.Module | None = None, layer: int = -2,
) -> torch.Tensor:
    """The scorer's input for a caption: see `decode_caption`."""
    return decode_caption(model, image_embeds, input_ids, decoder, layer)[0]


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two token sequences: insertions, deletions, substitutions."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def caption_ids(model: BlipForConditionalGeneration, tokenizer, captions: list[str]) -> torch.Tensor:
    """Captions as the decoder produced them: [DEC] tokens... [SEP], padded with [PAD]."""
    text_config = model.config.text_config
    rows = [[text_config.bos_token_id, *tokenizer(c, add_special_tokens=False).input_ids, text_config.sep_token_id]
            for c in captions]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [text_config.pad_token_id] * (width - len(r)) for r in rows], dtype=torch.long)


class Captioner:
    """Stage: `image`, `mask` -> `caption` (str) and `caption_features` (B, D) float32.

    `output` renames both columns (`<output>`, `<output>_features`), e.g. to caption with a
    fine-tuned BLIP next to the original's caption. `feature_layer`: see `decode_caption`.
    """

    def __init__(self, captioner: CaptionerModel, max_new_tokens: int = 30, num_beams: int = 1,
                 output: str = "caption", feature_layer: int = -2):
        self.output, self.feature_layer = output, feature_layer
        self.bundle = captioner
        self.model = captioner.model
        self.device = self.model.device
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image_embeds = visible_embeddings(self.bundle, batch["image"], batch["mask"])
        ids = generate_captions(self.model, image_embeds, **self.generate_kwargs)
        features = caption_features(self.model, image_embeds, ids, layer=self.feature_layer)
        return {
            **batch,
            self.output: np.array(caption_texts(self.bundle.tokenizer, ids), dtype=object),
            f"{self.output}_features": features.float().cpu().numpy(),
        }


def candidate_captions(bundle: CaptionerModel, image_embeds: torch.Tensor, ids: list[str], seed: int, n: int,
                       max_new_tokens: int = 30, num_beams: int = 1) -> list[list[str]]:
    """`n` captions per image: the greedy (or beam) caption generation gives, then `n - 1`
    sampled (`SAMPLING`), each image's drawn from its own seed (`seeds.sample_seed` of its
    id): neither batch composition nor order nor a rerun changes them."""
    model = bundle.model
    greedy = caption_texts(bundle.tokenizer, generate_captions(model, image_embeds, max_new_tokens=max_new_tokens,
                                                               num_beams=num_beams, do_sample=False))
    out = [[caption] for caption in greedy]
    if n < 2:
        return out
    cuda = [image_embeds.device] if image_embeds.device.type == "cuda" else []
    for captions, embeds, sample_id in zip(out, image_embeds, ids):
        with torch.random.fork_rng(devices=cuda):  # the actor's own random state stays as it was
            torch.manual_seed(sample_seed(seed, sample_id, "candidates"))
            sampled = generate_captions(model, embeds.unsqueeze(0).expand(n - 1, -1, -1),
                                        max_new_tokens=max_new_tokens, **SAMPLING)
        captions += caption_texts(bundle.tokenizer, sampled)
    return out


def predicted_losses(model: BlipForConditionalGeneration, tokenizer, scorer: ScoreNet, weights: LossWeights,
                     image_embeds: torch.Tensor, captions: list[list[str]], layer: int = -2) -> list[torch.Tensor]:
    """The frozen scorer's L_BLIP (lower is better) of each caption of each image, from the
    caption's features (`caption_features`): one decoder pass over all the captions."""
    counts = torch.tensor([len(c) for c in captions], device=image_embeds.device)
    ids = caption_ids(model, tokenizer, [c for group in captions for c in group]).to(image_embeds.device)
    features = caption_features(model, image_embeds.repeat_interleave(counts, dim=0), ids, layer=layer)
    ssim, psnr, clip = scorer.destandardize(scorer(features.float())).unbind(dim=1)
    return list(blip_losses(ssim, psnr, clip, weights).split(counts.tolist()))


class Reranker:
    """Stage: `image`, `mask`, `id` -> `caption_reranked`: of `candidates` captions per image
    (`candidate_captions`), the one for which the frozen scorer predicts the lowest L_BLIP
    (the greedy caption on a tie). No inpainting per candidate: the cost is the candidates'
    decoder passes and one scorer pass. With `candidates=1` it is the greedy caption."""

    def __init__(self, captioner: CaptionerModel, scorer: ScoreNet, weights: LossWeights, candidates: int,
                 seed: int, max_new_tokens: int = 30, num_beams: int = 1, feature_layer: int = -2,
                 output: str = "caption_reranked"):
        self.bundle, self.scorer, self.weights = captioner, scorer.to(captioner.model.device), weights
        self.candidates, self.seed, self.output, self.feature_layer = candidates, seed, output, feature_layer
        self.decoding = dict(max_new_tokens=max_new_tokens, num_beams=num_beams)

    @torch.inference_mode()
    def rank(self, batch: dict[str, np.ndarray]) -> tuple[list[list[str]], list[torch.Tensor]]:
        """Each image's candidates and their predicted L_BLIP."""
        embeds = visible_embeddings(self.bundle, batch["image"], batch["mask"])
        ids = [str(i) for i in batch["id"]]
        captions = candidate_captions(self.bundle, embeds, ids, self.seed, self.candidates, **self.decoding)
        losses = predicted_losses(self.bundle.model, self.bundle.tokenizer, self.scorer, self.weights, embeds,
                                  captions, self.feature_layer)
        return captions, losses

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions, losses = self.rank(batch)
        picks = [int(torch.argmin(loss)) for loss in losses]  # the first of equals
        best = [group[k] for group, k in zip(captions, picks)]
        if "caption" in batch:
            # The greedy pick as the row already has it (generate's): decoded again in another
            # batch, half-precision kernels may change a token, and the pick must still read
            # as the greedy caption (evaluate then reuses that variant's inpainting).
            best = [str(c) if k == 0 else b for b, k, c in zip(best, picks, batch["caption"])]
        return {**batch, self.output: np.array(best, dtype=object)}
