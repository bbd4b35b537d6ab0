"""The embedded default run through the whole pipeline, shared by the tests that read it."""

import os
import subprocess
import sys

import pytest
from helpers import PIPELINE_ARGS


@pytest.fixture(scope="session")
def main_run(local_ray, tmp_path_factory):
    """The README's main command (`helpers.PIPELINE_ARGS`), run once for the session, as a
    user runs it: a process of its own (joined to the session's Ray), its output not a
    terminal, as under `ray job submit` or in CI. Returns its exit code, its working
    directory (`run_dir` is relative, as the default is) and what it printed.

    Tests that change a run work on a copy (`helpers.copy_run`)."""
    folder = tmp_path_factory.mktemp("pipeline")
    address = f"ray_address={local_ray.get_runtime_context().gcs_address}"
    done = subprocess.run([sys.executable, "-m", "rayjobs.pipeline", *PIPELINE_ARGS, address], cwd=folder,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200,
                          env=os.environ.copy())
    return done.returncode, folder, done.stdout
