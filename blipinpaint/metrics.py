"""Per-sample quality metrics: SSIM, PSNR (whole image and inside the hole), CLIP score.

SSIM and PSNR come from torchmetrics. CLIP score follows torchmetrics' `CLIPScore`
definition, `max(100 * cos(E_image, E_text), 0)`, computed per sample from the CLIP
model's projected embeddings: torchmetrics' own class averages over a batch and cannot
read transformers 5 feature outputs.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from blipinpaint.models import ClipModel

# The generate step's variants: metric column suffix -> (image column, caption column).
# Both are scored against the same caption, BLIP's, so their CLIP scores compare.
GENERATE_VARIANTS = {"": ("inpainted", "caption"), "_baseline": ("inpainted_baseline", "caption")}


def to_unit_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1]."""
    # A copy where the batch is read-only (Arrow-backed): torch cannot take such an array as is.
    images = np.ascontiguousarray(images) if images.flags.writeable else np.array(images)
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255.0


def ssim_psnr(preds: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image SSIM and PSNR over the whole image and over the hidden pixels only.

    `masks` is (B, H, W) bool. Hole SSIM averages the SSIM map over the hole; hole PSNR
    uses the MSE of the hole's pixels alone.
    """
    # Imported here: torchmetrics' package import pulls in scipy, seconds that every process
    # importing the stages (not only the metrics actor) would otherwise pay.
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    ssim, ssim_map = structural_similarity_index_measure(
        preds, target, data_range=1.0, reduction="none", return_full_image=True
    )
    hole = masks.unsqueeze(1).expand_as(ssim_map).float()
    per_hole = hole.sum(dim=(1, 2, 3)).clamp(min=1)
    psnr_hole = torch.stack([
        peak_signal_noise_ratio(p[m.expand_as(p)], t[m.expand_as(t)], data_range=1.0)
        for p, t, m in zip(preds, target, masks.unsqueeze(1))
    ])
    return {
        "ssim": ssim,
        "psnr": peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim_hole": (ssim_map * hole).sum(dim=(1, 2, 3)) / per_hole,
        "psnr_hole": psnr_hole,
    }


class ClipScorer:
    """`max(100 * cos, 0)` between each image and its text, batched."""

    def __init__(self, clip: ClipModel):
        self.clip = clip
        self.model = clip.model
        self.device = self.model.device

    @torch.inference_mode()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tokens = self.clip.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self.model.get_text_features(**tokens).pooler_output

    @torch.inference_mode()
    def image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        pixels = self.clip.image_processor(images=list(images), return_tensors="pt").pixel_values
        return self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)).pooler_output

    @staticmethod
    def score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return (100 * cos).clamp(min=0)


class InpaintMetrics:
    """Stage: ground truth `image`, `mask`, inpaintings and captions -> metric columns.

    Per `variants` entry (suffix -> (image column, caption column)): ssim, psnr,
    ssim_hole, psnr_hole and clip_score (image against that caption), each with the suffix.
    """

    def __init__(self, clip: ClipModel, variants: dict[str, tuple[str, str]] | None = None):
        self.clip = ClipScorer(clip)
        self.device = self.clip.device
        self.variants = variants or GENERATE_VARIANTS

    def with_variants(self, variants: dict[str, tuple[str, str]]) -> InpaintMetrics:
        """This stage for other `variants`, with the same CLIP (its weights loaded once)."""
        twin = copy.copy(self)
        twin.variants = variants
        return twin

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        target = to_unit_tensor(batch["image"], self.device)
        masks = torch.from_numpy(batch["mask"].astype(bool)).to(self.device)
        captions = {c for _, c in self.variants.values()}
        texts = {c: self.clip.text_embeddings([str(t) for t in batch[c]]) for c in captions}
        out = dict(batch)
        for suffix, (column, caption) in self.variants.items():
            preds = to_unit_tensor(batch[column], self.device)
            for name, values in ssim_psnr(preds, target, masks).items():
                out[name + suffix] = values.float().cpu().numpy()
            clip = self.clip.score(self.clip.image_embeddings(batch[column]), texts[caption])
            out["clip_score" + suffix] = clip.cpu().numpy()
        return out
