"""The inpainter as it runs on a GPU (`blipinpaint.acceleration`), checked on CPU: SDPA
attention as loaded, channels-last weights and a compiled UNet (inductor, which needs a C++
compiler: `g++`) make the fused loop's images within the tolerance between two eager runs,
and the compiled stage pads every batch to one shape, so it compiles once, at build time."""

import numpy as np
import pytest
import torch
from helpers import FUSED_TOLERANCE, take
from torch._dynamo.utils import counters

from blipinpaint import builders
from blipinpaint.acceleration import channels_last
from blipinpaint.config import load_config
from blipinpaint.inpainting import denoise

SEEDS = [11, 22, 33]


@pytest.fixture(scope="module")
def captioned(captioner, sample_batch):
    return captioner(take(sample_batch, [0, 1, 2]))


def variants(batch) -> dict:
    return {"guided": [str(c) for c in batch["caption"]], "baseline": None}


@pytest.fixture(scope="module")
def compiled(cfg):
    """The tiny inpainter with `inpaint.compile=default`, fixed at batches of 3 rows; with the
    number of graphs dynamo had compiled before it was built."""
    # One thread: inductor's CPU kernels open an OpenMP region for every loop, however small,
    # and on 2 busy cores each waits for both threads (measured: 8-20 s a batch against 0.8 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before = counters["stats"]["unique_graphs"]
    stage = builders.build_inpainter(load_config(overrides=[f"run_dir={cfg.run_dir}", "inpaint.compile=default",
                                                            "stream.inpainter.batch_size=3"]))
    yield stage, before
    torch._dynamo.reset()  # the compiled graphs and their guards hold the tiny UNet
    torch.set_num_threads(threads)


def test_diffusers_own_sdpa_attention_is_what_the_unet_and_vae_run(inpainter):
    """diffusers 0.42 gives each attention block `AttnProcessor2_0` (PyTorch's SDPA) where torch
    has it; nothing in the project may set another."""
    for model in (inpainter.pipe.unet, inpainter.pipe.vae):
        assert {type(p).__name__ for p in model.attn_processors.values()} == {"AttnProcessor2_0"}


def test_channels_last_weights_make_the_same_images(inpainter, captioned):
    """What `build_inpainter` does on CUDA (`channels_last`), on CPU: the weights change layout
    (the convolutions then run NHWC), the images do not."""
    pipe = inpainter.pipe
    eager = denoise(pipe, captioned["image"], captioned["mask"], variants(captioned), SEEDS, 3, 7.5)
    try:
        channels_last(pipe)
        for model in (pipe.unet, pipe.vae):
            weight = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight  # a 3x3 conv_in
            assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        nhwc = denoise(pipe, captioned["image"], captioned["mask"], variants(captioned), SEEDS, 3, 7.5)
    finally:
        for model in (pipe.unet, pipe.vae):
            model.to(memory_format=torch.contiguous_format)
    for column in eager:
        assert np.abs(nhwc[column] - eager[column]).max() < FUSED_TOLERANCE["fp32"], column


def test_the_compiled_unet_makes_the_eager_loops_images(compiled, inpainter, captioned):
    """Inductor's kernels against eager PyTorch's, through the whole fused loop, in fp32:
    within the tolerance the fused-loop test allows (in bf16 they are not: `compile_unet`)."""
    stage, before = compiled
    assert stage.warmup_s is not None and stage.pipe.unet._compiled_call_impl is not None
    assert counters["stats"]["unique_graphs"] > before  # compiled when built, not on a batch
    graphs = counters["stats"]["unique_graphs"]
    fast = denoise(stage.pipe, captioned["image"], captioned["mask"], variants(captioned), SEEDS, 3, 7.5)
    eager = denoise(inpainter.pipe, captioned["image"], captioned["mask"], variants(captioned), SEEDS, 3, 7.5)
    assert counters["stats"]["unique_graphs"] == graphs
    for column in eager:
        assert np.abs(fast[column] - eager[column]).max() < FUSED_TOLERANCE["fp32"], column
    assert np.abs(fast["guided"] - fast["baseline"]).max() > 0.1  # the images are not blank


def test_padding_keeps_one_compiled_shape_and_padded_rows_never_reach_the_outputs(compiled, captioned):
    """Batches of 1, 2, 3 and 4 rows (3 + 1) all run as 3 rows: no new graph is compiled, and
    each batch comes back with exactly its own rows, each image the one it gets in a full batch."""
    stage, _ = compiled
    graphs = counters["stats"]["unique_graphs"]
    full = stage(captioned)
    for index in ([0], [1, 2], [0, 1, 2, 0]):
        batch = take(captioned, index)
        out = stage(batch)
        assert counters["stats"]["unique_graphs"] == graphs, index  # one compiled shape for every batch size
        assert list(out["id"]) == list(batch["id"]) and len(out["inpainted"]) == len(index)
        assert list(out["noise_seed"]) == [full["noise_seed"][i] for i in index]
        for column in ("inpainted", "inpainted_baseline"):
            # A row's image may round differently at another position of the batch, by a level at most.
            diff = np.abs(out[column].astype(int) - full[column][index].astype(int))
            assert diff.max() <= 1, (index, column)
