"""Shared fixtures: the tiny preset built once per session, offline, into a temp cache."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

# Before any Hugging Face import: a test that reaches for the hub fails instead of waiting,
# and the only hub cache is this session's own (empty until `paper_hub` lays it out), never
# the user's ~/.cache/huggingface.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
HUB_CACHE = Path(tempfile.mkdtemp(prefix="blipinpaint-hub-"))
atexit.register(shutil.rmtree, HUB_CACHE, ignore_errors=True)
os.environ["HF_HUB_CACHE"] = str(HUB_CACHE)
# Ray writes its auth token to ~/.ray/auth_token, `ray start` and matplotlib write there too:
# a home of the session's own leaves the real one untouched, and a token found there was
# written by this session's Ray, not left by an earlier run.
HOME = Path(tempfile.mkdtemp(prefix="blipinpaint-home-"))
atexit.register(shutil.rmtree, HOME, ignore_errors=True)
os.environ["HOME"] = str(HOME)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Every Ray this session starts, or a job it launches starts, stays on 127.0.0.1.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from blipinpaint import builders  # noqa: E402
from blipinpaint.config import load_config, sample_images_dir  # noqa: E402
from blipinpaint.source_reads import read_files  # noqa: E402
from blipinpaint.sources import items_to_batch, list_folder  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Every test session builds its own offline models: nothing depends on ~/.cache."""
    root = tmp_path_factory.mktemp("model-cache")
    previous = os.environ.get("BLIPINPAINT_CACHE")
    os.environ["BLIPINPAINT_CACHE"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("BLIPINPAINT_CACHE", None)
    else:
        os.environ["BLIPINPAINT_CACHE"] = previous


@pytest.fixture(scope="session")
def paper_hub() -> Path:
    """The hub cache holding the `paper` preset's repos at their pinned commits (tiny weights)."""
    from hub_rehearsal import build_hub_cache

    build_hub_cache(HUB_CACHE)
    return HUB_CACHE


@pytest.fixture(scope="session")
def cfg(tmp_path_factory, model_cache):
    return load_config(overrides=[f"run_dir={tmp_path_factory.mktemp('run')}"])


@pytest.fixture(scope="session")
def captioner(cfg):
    return builders.build_captioner(cfg)


@pytest.fixture(scope="session")
def inpainter(cfg):
    return builders.build_inpainter(cfg)


@pytest.fixture(scope="session")
def metrics(cfg):
    return builders.build_metrics(cfg)


@pytest.fixture(scope="session")
def sample_batch(cfg) -> dict[str, np.ndarray]:
    """The shipped photographs, decoded and masked: the input of the model stages."""
    items = list_folder(str(sample_images_dir()))[:4]
    batch = builders.build_decoder(cfg)(read_files(items_to_batch(items)))
    assert not any(batch["error"]), batch["error"]
    return builders.build_masker(cfg)(batch)


@pytest.fixture(scope="session", autouse=True)
def s3():
    """An S3 endpoint on 127.0.0.1 for the session (moto's server), reached the way a user
    reaches a bucket: through the standard AWS variables, which every Ray worker started
    after this inherits (so it starts first, whichever test starts Ray). Yields a function
    that makes a bucket and returns its `s3://` URI."""
    import boto3
    from moto.server import ThreadedMotoServer

    from blipinpaint import storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    # The HTTP requests the endpoint answers, per bucket: clients reach an endpoint given by
    # its IP with path-style URLs (/<bucket>/<key>), pyarrow's and boto3's alike.
    requests, app = Counter(), server._server.app

    def counting(environ, start_response):
        requests[environ.get("PATH_INFO", "/").split("/")[1]] += 1
        return app(environ, start_response)

    server._server.app = counting
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "blipinpaint-test",
                       "AWS_SECRET_ACCESS_KEY": "blipinpaint-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1"})
    storage._remote.cache_clear()  # one pyarrow client per bucket and process: made for this endpoint
    client = boto3.client("s3")

    def bucket(name: str) -> str:
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    bucket.requests = lambda name: requests[name]  # the requests the endpoint answered for a bucket
    yield bucket
    server.stop()


@pytest.fixture(scope="session")
def local_ray(model_cache, s3):
    """One local Ray for the session, on 127.0.0.1, started the way the jobs start it (after
    the S3 endpoint: its workers see the AWS variables)."""
    import ray

    from rayjobs.cluster import connect

    connect()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from the system's packages (Debian's `chromium` and `chromium-driver`,
    installed by `.ci/run`), driven by Selenium; nothing is downloaded (Selenium Manager is
    kept offline). Logs the console and the network, for `helpers.open_page`."""
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = {name: shutil.which(name) for name in ("chromium", "chromedriver")}
    missing = [name for name, path in paths.items() if path is None]
    if missing:  # the page's tests must run: fail, never skip
        raise RuntimeError(f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = paths["chromium"]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(paths["chromedriver"]), options=options)
    yield driver
    driver.quit()
