"""Put the run's pinned checkpoints into its model store: fetched once, verified, as safetensors.

    python -m rayjobs.models [--config CONFIG.yaml] [dotted.key=value ...]

On a cluster (the tunnel, the token, logs and stop: docs/cluster.md):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.models --config configs/paper-coco.yaml

Each role whose checkpoint is a hub id (every role of `paper`) is fetched at its pinned
commit and checked against the hashes the hub lists; the standard FID Inception's weights
come from their pinned URL or the local copy `models.fid.name_or_path` names, checked
against their pinned sha256 (docs/models.md). Each is converted to safetensors (pickles
read with `torch.load(weights_only=True)`) and written to `models.store` (default
`run_dir/models`), its manifest last. Workers load only these folders: no node downloads
from the hub and no worker reads a pickle. Every job that loads models runs this step
first on its driver; local folders are loaded as they are.
"""

from __future__ import annotations

import logging
import sys

from blipinpaint.builders import fill_store
from blipinpaint.config import Config
from rayjobs.cli import job_main

log = logging.getLogger("blipinpaint.models")


def run(cfg: Config) -> dict:
    """Every stored role's entry (fetched now, or found complete): {role: {uri, source, files, reused}}."""
    return fill_store(cfg)


def main(argv: list[str] | None = None) -> int:
    return job_main("models", __doc__, run, print_report, argv)


def print_report(entries: dict) -> None:
    if not entries:
        print("\nno hub checkpoints in this config: every model loads from a local folder")
    for role, entry in entries.items():
        state = "already in the store" if entry["reused"] else f"stored {len(entry['files'])} files"
        converted = [f["from"] for f in entry["files"].values() if f.get("how", "").startswith("pickle")]
        note = f"; converted to safetensors: {', '.join(converted)}" if converted and not entry["reused"] else ""
        print(f"{role:<10} {state}{note}\n           {entry['uri']}")


if __name__ == "__main__":
    sys.exit(main())
