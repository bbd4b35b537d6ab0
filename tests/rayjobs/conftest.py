"""The embedded default run through the whole pipeline, shared by the tests that read it."""

import pytest
from helpers import PIPELINE_ARGS

from rayjobs import pipeline


@pytest.fixture(scope="session")
def main_run(local_ray, tmp_path_factory):
    """The README's main command (`helpers.PIPELINE_ARGS`), run once for the session.

    With a relative run_dir, as the default is: workers must write where the driver reads.
    Tests that change a run work on a copy (`helpers.copy_run`)."""
    folder = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        code = pipeline.main(PIPELINE_ARGS)
    return code, folder
