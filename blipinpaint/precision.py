"""How much of a fine-tune survives the precision its text decoder is evaluated in.

The paper's lr 1e-6 moves a weight by about 1e-6 a step. Half a unit in the last place of
bf16 near a weight of 0.02 is about 6e-5 (of fp16 about 8e-6): cast to half precision, a
decoder fine-tuned so holds the original weights again wherever the updates stayed below
that, and its captions are the original BLIP's however it trained. The fine-tune and the
evaluation report, of the decoder weights fine-tuning changed (in fp32), how many still
differ from the original once both are cast to the evaluation dtype.
"""

from __future__ import annotations

import torch

from blipinpaint.models.loading import DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def surviving_changes(original: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Of the weights in `tuned` (fp32, by name) that differ from `original`'s, how many still
    differ once both are cast to `dtype`: {dtype, weights, changed, survived, survived_share}
    (`survived_share` None when nothing changed; 1.0 at fp32)."""
    weights = changed = survived = 0
    for name, before in original.items():
        after = tuned[name].to(before.device)
        moved = before != after
        weights += before.numel()
        changed += int(moved.sum())
        survived += int((moved & (before.to(dtype) != after.to(dtype))).sum())
    return {"dtype": DTYPE_NAMES[dtype], "weights": weights, "changed": changed, "survived": survived,
            "survived_share": survived / changed if changed else None}


def survival_line(survival: dict) -> str:
    """The reports' sentence on `surviving_changes`."""
    share = survival["survived_share"]
    share = "none changed" if share is None else f"{100 * share:.1f} %"
    return (f"decoder evaluated in {survival['dtype']}: {survival['survived']} of the {survival['changed']} weights "
            f"fine-tuning changed survive the cast ({share})")
