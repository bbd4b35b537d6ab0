"""What a finished generate step recorded, as the jobs that read a whole run (export, audit) take it.

A run is read only when its generate step finished (`_SUCCESS`), under the fingerprint its
folder was claimed with (`fingerprint.json`), and with the settings of the command that
reads it: a folder claimed again after it finished, or read with another config, would
pass off other rows for these.
"""

from __future__ import annotations

import json

from blipinpaint import fingerprint
from blipinpaint.config import Config
from blipinpaint.errors import ConfigError
from blipinpaint.layout import RunLayout
from blipinpaint.storage import is_file, read_text

MODEL_ROLES = ("captioner", "inpainter", "clip")  # the models a generated row depends on


def finished_generate(cfg: Config) -> dict:
    """Generate's fingerprint (settings and model digests) of the run at `cfg.run_dir`, once it
    is known to have finished under it with `cfg`'s settings; else a ConfigError saying why."""
    folder = RunLayout(cfg.run_dir).generate
    if not is_file(folder.success):
        raise ConfigError(f"{folder} is not complete (no _SUCCESS): run rayjobs.generate (again) first; only a "
                          "finished run is read")
    if not is_file(folder.fingerprint):
        raise ConfigError(f"{folder} has no fingerprint.json: nothing says what made its rows (written before "
                          "fingerprints?); run rayjobs.generate with restart=[generate] to redo it")
    recorded = json.loads(read_text(folder.fingerprint))
    try:
        finished = json.loads(read_text(folder.success) or "null")
    except ValueError:
        finished = None
    if not isinstance(finished, dict):
        raise ConfigError(f"{folder}/_SUCCESS holds no fingerprint (written before fingerprints?): run "
                          "rayjobs.generate again to finish the folder under its fingerprint")
    changed = fingerprint.differing(recorded, finished)
    if changed:
        raise ConfigError(f"{folder} finished under another fingerprint than the one it holds now "
                          f"({', '.join(changed)} differ between _SUCCESS and fingerprint.json): it was claimed "
                          "again after it finished; run rayjobs.generate again to finish it")
    asked = fingerprint.generate_settings(cfg)
    changed = sorted(k for k in asked if recorded.get(k) != asked[k])
    if changed:
        raise ConfigError(f"{folder} holds rows generated with other settings than this command's "
                          f"({', '.join(changed)} differ): give the config the run was made with")
    return recorded


def model_mismatches(recorded: dict, current: dict[str, str]) -> list[str]:
    """A line per model whose digest now (`current`, role -> digest) is not the one the run
    recorded: the model store no longer holds the bytes the rows were made with."""
    digests = recorded.get("model_digests") or {}
    return [f"{role}: the run used {digests.get(role)}, the store now holds {current[role]}"
            for role in sorted(current) if digests.get(role) != current[role]]
