import hashlib

import pytest
import torch

from blipinpaint.models.fid_inception import expected_shapes


def fid_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the names and shapes of torch-fidelity's release file: convolutions
    scaled to keep activations in range, batch-norm statistics that are not the identity. As
    the release file, it has no `num_batches_tracked` (its converter writes none)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes().items():
        if name.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[name] = torch.randn(shape, generator=generator) * (2 / fan_in) ** 0.5
        elif name.endswith(("running_var", "bn.weight")):
            state[name] = torch.rand(shape, generator=generator) + 0.5
        else:  # biases, running means, the classifier
            state[name] = torch.randn(shape, generator=generator) * 0.1
    return state


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory):
    """A stand-in for torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (95 MB, a
    pickle of the real names and shapes, random values) and its sha256: the "pinned" one of the
    tests, which pass it where the code takes the real pin as a parameter."""
    path = tmp_path_factory.mktemp("fid-weights") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(fid_inception_state(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()
