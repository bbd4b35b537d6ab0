"""The inpainter's UNet and VAE run the way the fastest Stable Diffusion setups run them.

- Attention: PyTorch's fused scaled-dot-product attention (SDPA: flash or memory-efficient
  kernels on GPUs). diffusers 0.42 gives every `Attention` block `AttnProcessor2_0`, its
  SDPA processor, whenever `torch.nn.functional.scaled_dot_product_attention` exists; the
  project never sets another processor (`tests/test_acceleration.py` checks the loaded
  UNet's and VAE's).
- Layout: on CUDA the UNet and the VAE hold their weights channels-last (NHWC), the layout
  cuDNN's tensor-core convolutions work in, so no convolution transposes its input and
  output.
- `inpaint.compile`: the UNet through `torch.compile` (inductor), nearly all of the work
  (50 steps x 3 rows per image against one VAE decode). Compiled kernels change the
  rounding: see `compile_unet`.

BLIP and CLIP are left as they load. Channels-last would touch one convolution of each
(a vision transformer's patch embedding). CLIP's attention is already SDPA (transformers'
default where a model supports it); BLIP's has no SDPA path in transformers 5.23 (its
attention is a matmul and a softmax), and patching it would change the captions the
paper's BLIP makes. Neither is compiled: their forward passes are well under 1 % of an
image's FLOPs (BLIP's ViT-B/16 at 384² once and CLIP's ViT-L/14 at 224² twice per image,
about 0.4 TFLOP, against 150 UNet rows at 512², about 100), so compiling them could save
no more than that, and BLIP's generate loop changes shape with every token.
"""

from __future__ import annotations

import torch

from blipinpaint.config_checks import COMPILE_MODES


def channels_last(pipe) -> None:
    """The UNet's and the VAE's weights in channels-last layout (the CUDA convolutions' own)."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)


def compile_unet(pipe, mode: str) -> None:
    """Compile the pipeline's UNet in place (`nn.Module.compile`: the module, its config and
    its state dict stay what they were) with `mode`, unless it is `off`. Compilation happens
    on the first call (`Inpainter.warm_up`), once per input shape.

    Inductor's fused kernels round differently from eager ones: measured on CPU with the tiny
    UNet (2026-12, torch 2.13), the fused loop's images moved by at most 2e-6 in fp32 but by
    6/255 in bf16 after 3 steps, more than the 3/255 the fused-loop test allows between two
    eager computations. Hence `inpaint.compile` is in generate's fingerprint when on."""
    if mode == "off":
        return
    if mode not in COMPILE_MODES:
        raise ValueError(f"inpaint.compile={mode!r} is not one of {list(COMPILE_MODES)}")
    # dynamic=False: one static graph for the one padded batch shape, never a slower
    # shape-generic one after a second size was seen.
    pipe.unet.compile(mode=mode, dynamic=False)
