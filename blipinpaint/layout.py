"""Every path of a run folder, in one place.

A run lives below `run_dir` (a local folder or a bucket prefix): one folder per step, each
holding the same kinds of files. Jobs, tests and benches ask a `RunLayout` for a path
instead of building the string, so a folder's name is written once.
"""

from __future__ import annotations

# The steps of a run whose outputs `restart` may replace, in the order the pipeline runs them
# (`export`, which reads generate's rows, runs apart: python -m rayjobs.export).
STEPS = ("generate", "candidates", "scorer", "finetune", "eval", "export")


class Folder(str):
    """A folder of the run (a path or URI string), whose files are named here."""

    def __truediv__(self, name: str) -> Folder:
        return Folder(f"{self}/{name}")

    samples = property(lambda self: self / "samples")  # committed Parquet parts
    errors = property(lambda self: self / "errors")  # committed error rows
    config = property(lambda self: self / "config.yaml")  # the resolved config of the job that wrote here
    fingerprint = property(lambda self: self / "fingerprint.json")  # the settings the rows depend on
    stats = property(lambda self: self / "stats.json")
    success = property(lambda self: self / "_SUCCESS")  # every input accounted for
    report = property(lambda self: self / "report.json")
    metrics = property(lambda self: self / "metrics.jsonl")  # a training job's log
    ray_train = property(lambda self: self / "ray_train")  # Ray Train's checkpoints
    ray_stats = property(lambda self: self / "ray_stats.txt")  # Ray Data's execution statistics


class RunLayout:
    """The folders of the run below `run_dir`."""

    def __init__(self, run_dir: str):
        self.root = Folder(run_dir.rstrip("/"))
        self.models = self.root / "models"  # the model store, unless `models.store` says elsewhere
        self.generate = self.root / "generate"
        self.candidates = self.root / "candidates"
        self.scorer = self.root / "scorer"
        self.scorer_model = self.scorer / "model"  # a ScoreNet folder (safetensors + config.json)
        self.finetune = self.root / "finetune"
        self.finetune_check = self.finetune / "check.json"  # digests of what fine-tuning changed and kept
        self.blip = self.root / "blip"  # the fine-tuned BLIP, a Hugging Face folder
        self.eval = self.root / "eval"
        self.export = self.root / "export"  # rayjobs.export's, unless `export.out` says elsewhere
        self.audit = self.root / "audit"  # rayjobs.audit's reports, unless `audit.out` says elsewhere
