"""BLIP captions of the visible background, and the caption features the scorer learns from.

The captioner only ever receives the masked image (hidden pixels replaced by gray), so a
caption cannot leak what the inpainter is asked to reconstruct.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from blipinpaint.masks import masked_pixels
from blipinpaint.models import CaptionerModel

if TYPE_CHECKING:
    from transformers import BlipForConditionalGeneration



def encode_images(model: BlipForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    return model.vision_model(pixel_values=pixel_values).last_hidden_state


def generate_captions(
    model: BlipForConditionalGeneration, image_embeds: torch.Tensor, **generate_kwargs
) -> torch.Tensor:
    """Token ids ([DEC] caption... [SEP] [PAD]...) from precomputed image embeddings.

    Same decoding as `BlipForConditionalGeneration.generate`, but reusing the vision
    pass that the feature computation needs as well (the ViT is most of BLIP's cost).
    """
    text_config = model.config.text_config
    start = torch.full((image_embeds.shape[0], 1), text_config.bos_token_id, device=image_embeds.device)
    return model.text_decoder.generate(
        input_ids=start,
        eos_token_id=text_config.sep_token_id,
        pad_token_id=text_config.pad_token_id,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
        **generate_kwargs,
    )


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
    out = (decoder or model.text_decoder)(
        input_ids=input_ids,
        attention_mask=(input_ids != model.config.text_config.pad_token_id).long(),
        encoder_hidden_states=image_embeds,
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
        visible = masked_pixels(batch["image"], batch["mask"])
        pixels = self.bundle.image_processor(images=list(visible), return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.model.dtype)
        image_embeds = encode_images(self.model, pixels)
        ids = generate_captions(self.model, image_embeds, **self.generate_kwargs)
        features = caption_features(self.model, image_embeds, ids, layer=self.feature_layer)
        return {
            **batch,
            self.output: np.array(caption_texts(self.bundle.tokenizer, ids), dtype=object),
            f"{self.output}_features": features.float().cpu().numpy(),
        }
