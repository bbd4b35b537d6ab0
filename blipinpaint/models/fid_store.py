"""The FID Inception's entries in the model store: its weights from the pinned release URL or a file.

FID is defined by one set of weights, torch-fidelity's release file (`presets.FID_INCEPTION_URL`,
pinned by sha256). The store takes them from that URL, or from a copy of the file given as
`models.fid.name_or_path` (an air-gapped cluster, a mirror): either way the file's sha256 is
checked before it is unpickled (`torch.load(weights_only=True)`), its state dict is checked to
load into `fid_inception.FidInceptionV3`, and the entry's manifest records the sha256 it was
checked against. That record, not a name, is what makes the report call the network standard
(`loading.describe_fid_features`). A file of other weights enters only when named by its
sha256 (`models.fid.revision`), and is recorded as not the standard network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from blipinpaint.models import fid_inception
from blipinpaint.models.presets import FID_INCEPTION_SHA256, FID_INCEPTION_URL, FID_INCEPTION_V3, ModelRef
from blipinpaint.models.store import (
    Source,
    StoreError,
    download,
    keep_checked,
    pickle_to_safetensors,
    put,
    sha256,
)
from blipinpaint.storage import filesystem, is_remote

log = logging.getLogger(__name__)

# The store's config.json for the standard FID Inception: what `load_fid_features` builds.
STANDARD_INCEPTION = {**fid_inception.CONFIG, "weights": FID_INCEPTION_URL}


def source_of(ref: ModelRef, downloads: Path) -> Source:
    """The entry of `ref`: the standard FID Inception (from the release URL, fetched into
    `downloads`) or a weights file, checked against `ref.revision` (default: the pinned sha256)."""
    if ref.name_or_path == FID_INCEPTION_V3:
        return inception_source(downloads)
    return weights_file_source(ref.name_or_path, ref.revision or FID_INCEPTION_SHA256, downloads)


def inception_source(downloads: Path, url: str = FID_INCEPTION_URL,
                     expected_sha256: str = FID_INCEPTION_SHA256) -> Source:
    """The standard FID Inception's weights (a pickle at a pinned URL: `expected_sha256` is its pin) as safetensors."""
    return _inception_entry(url, {"url": url, "sha256": expected_sha256},
                            lambda: download(url, expected_sha256, downloads), pinned_sha256=expected_sha256)


def weights_file_source(path: str, expected_sha256: str, downloads: Path,
                        pinned_sha256: str = FID_INCEPTION_SHA256) -> Source:
    """FID Inception weights from a file (torch-fidelity's `.pth`: a path, or a file URI copied
    into `downloads`) instead of the release URL, kept only if its sha256 is `expected_sha256`.

    The pinned sha256 makes it the standard FID network: the same entry, under the same
    record, as the download (the same bytes make it). Any other sha256 must be named
    (`models.fid.revision`): the entry then holds a network of the same architecture with
    other weights, which its record and the report say are not the standard ones.
    """
    standard = expected_sha256 == pinned_sha256
    record = {"url": FID_INCEPTION_URL, "sha256": expected_sha256} if standard else {"sha256": expected_sha256}
    return _inception_entry(path, record, lambda: local_weights(path, expected_sha256, downloads, pinned_sha256),
                            pinned_sha256)


def local_weights(path: str, expected_sha256: str, downloads: Path, pinned_sha256: str = FID_INCEPTION_SHA256) -> Path:
    """The weights file at `path` on this machine (a file of a bucket: its copy in `downloads`),
    checked against `expected_sha256`; a mismatch says how to use the file anyway."""

    def mismatch(actual: str) -> str:
        if expected_sha256 != pinned_sha256:
            return f"{path}: sha256 {actual} is not the {expected_sha256} that models.fid.revision names"
        return (f"{path}: sha256 {actual} is not the standard FID Inception weights' (pinned {pinned_sha256}). To "
                f"evaluate with this file as another, non-standard network, name it: models.fid.revision={actual}")

    if is_remote(path):
        fs, remote = filesystem(path)
        return keep_checked(downloads, expected_sha256, lambda: fs.open_input_stream(remote), mismatch)
    local = Path(filesystem(path)[1])
    if not local.is_file():
        raise StoreError(f"models.fid: {path} is not a file (FID Inception weights: torch-fidelity's .pth)")
    actual = sha256(local)
    if actual != expected_sha256:
        raise StoreError(mismatch(actual))
    return local


def _inception_entry(origin: str, record: dict, obtain: Callable[[], Path],
                     pinned_sha256: str = FID_INCEPTION_SHA256) -> Source:
    """A store entry of FID Inception weights: `obtain()` gives the pickle from `origin`, its
    sha256 checked against the `record`'s, converted to safetensors beside a config.json
    naming the network. The manifest says whether that sha256 is the pinned standard one;
    the report reads it there (`loading.describe_fid_features`)."""
    expected = record["sha256"]
    standard = expected == pinned_sha256
    verdict = ("equals the pinned standard FID Inception weights'" if standard else
               f"is the one models.fid.revision names, not the standard FID weights' ({pinned_sha256})")

    def fill(staging: Path) -> dict:
        path = obtain()
        pickle_to_safetensors(path, staging / fid_inception.WEIGHTS_NAME, check=_inception_problems)
        fid_inception.write_config(staging, origin if standard else f"{origin} (sha256 {expected})")
        (log.info if standard else log.warning)("model store: FID Inception weights from %s: sha256 %s %s",
                                                origin, expected, verdict)
        return {fid_inception.WEIGHTS_NAME: {"from": origin, "hub_id": expected, "verified": f"sha256 {verdict}",
                                             "how": "pickle converted to safetensors (torch.load weights_only=True)",
                                             "sha256": sha256(staging / fid_inception.WEIGHTS_NAME)},
                "config.json": {"how": "written", "sha256": sha256(staging / "config.json")}}

    return Source(f"torch-fidelity--inception-v3-compat/{expected[:16]}", record, fill)


def _inception_problems(state: dict) -> list[str]:
    problems = fid_inception.state_problems(state)
    return [f"not torch-fidelity's inception-v3-compat state dict: {'; '.join(problems)}"] if problems else []


def put_fid_inception(uri: str, downloads: Path, url: str = FID_INCEPTION_URL,
                      expected_sha256: str = FID_INCEPTION_SHA256) -> dict:
    """The standard FID Inception into the store entry `uri` (from `url`, checked against `expected_sha256`)."""
    return put(ModelRef(FID_INCEPTION_V3), uri, inception_source(downloads, url, expected_sha256))
