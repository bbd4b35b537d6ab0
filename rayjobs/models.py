"""Put the run's pinned checkpoints into its model store: fetched once, verified, as safetensors.

On a GPU cluster (README, "Running on a cluster"; `~/.ray/auth_token` made first):

    ray up cluster.yaml && ray dashboard cluster.yaml &    # job API tunnelled to 127.0.0.1:8265
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}' \\
        -- python -m rayjobs.models --config configs/paper-coco.yaml
    RAY_AUTH_MODE=token ray job logs --address http://127.0.0.1:8265 --follow <submission id>
    RAY_AUTH_MODE=token ray job stop --address http://127.0.0.1:8265 <submission id>
    ray down cluster.yaml                                  # when every job is done

Locally:

    python -m rayjobs.models [--config CONFIG.yaml] [dotted.key=value ...]

For each role whose checkpoint is a hub id (every role of the `paper` preset) and for the
standard FID Inception: the files its ref names are fetched at its pinned commit into
this machine's Hugging Face cache, each is checked against the hash the hub lists for it,
pickles are converted to safetensors (read with `torch.load(weights_only=True)`), and the
folder goes to `models.store` (default `run_dir/models`; a bucket on a cluster), its
manifest last. Workers load only these folders: 16 GPU nodes do not each download 5 GB
from the hub, and no worker reads a pickle. Every job that loads models runs this step
first, on its driver; with the store complete it reads the manifests and nothing else.
Local folders (the offline presets, a fine-tuned BLIP) are loaded as they are.
"""

from __future__ import annotations

import logging
import sys

from blipinpaint import builders
from blipinpaint.config import Config, model_store
from blipinpaint.models import store
from blipinpaint.models.offline import cache_root
from blipinpaint.models.presets import FID_INCEPTION_V3
from rayjobs.common import job_main

log = logging.getLogger("blipinpaint.models")


def run(cfg: Config) -> dict:
    """Every stored role's entry (fetched now, or found complete): {role: {uri, source, files, reused}}."""
    root = model_store(cfg)
    entries = {}
    for role, ref in builders.stored_refs(cfg).items():
        uri = store.entry_uri(root, ref)
        if ref.name_or_path == FID_INCEPTION_V3:
            entry = store.put_fid_inception(uri, downloads=cache_root() / "downloads")
        else:
            entry = store.put(ref, uri)
        entries[role] = {"uri": uri, **entry}
    return entries


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
