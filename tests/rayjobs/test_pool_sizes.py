import os
from pathlib import Path

import psutil
import pytest

from blipinpaint.config import StageConfig, StreamConfig, load_config
from rayjobs.cluster import actor_resources, auto_sizes, pool


def test_fixed_and_autoscaling_pools():
    fixed = pool(StageConfig(size=3))
    assert (fixed.min_size, fixed.max_size) == (3, 3)
    scaling = pool(StageConfig(min_size=1, max_size=8))
    assert (scaling.min_size, scaling.max_size) == (1, 8)


def sizes(g: StreamConfig) -> dict:
    return {name: (s.size, s.min_size, s.max_size) for name in ("captioner", "inpainter", "metrics")
            for s in [getattr(g, name)]}


@pytest.mark.parametrize("cpus, inpainters", [(1, 1), (2, 2), (4, 6), (16, 30)])
def test_default_pools_fill_a_cpu_machine_with_inpainters(cpus, inpainters):
    """BLIP and CLIP a quarter core each, one read and one commit task a quarter core each (a
    share of their own each, so Ray Data keeps one free for the commits): the inpainters, half
    a core each, take the rest (at least one)."""
    g = auto_sizes(load_config().stream, {"CPU": cpus}, None)
    assert sizes(g) == {"captioner": (1, None, None), "inpainter": (inpainters, None, None),
                        "metrics": (1, None, None)}
    assert load_config().stream.inpainter.size == "auto"  # the config it came from is left as it was
    larger = auto_sizes(load_config(overrides=["stream.commit.num_cpus=0.75"]).stream, {"CPU": cpus}, None)
    assert larger.inpainter.size == max(1, inpainters - 1)  # the commits' share is left free
    # A few rows arrive in one read batch (8 rows): one inpainter, not an idle second one.
    assert sizes(auto_sizes(load_config().stream, {"CPU": cpus}, None, rows=6))["inpainter"] == (1, None, None)
    assert sizes(auto_sizes(load_config().stream, {"CPU": cpus}, None, rows=10_000))["inpainter"] == (
        inpainters, None, None)


def test_default_pools_on_gpus_and_on_an_autoscaling_cluster():
    """An inpainter per GPU that BLIP and CLIP (half a GPU each) leave; an autoscaling pool up
    to what the cluster's largest size holds. Sizes given in the config are kept."""
    gpu = ["stream.inpainter.num_gpus=1", "stream.captioner.num_gpus=0.5", "stream.metrics.num_gpus=0.5"]
    g = load_config(overrides=gpu).stream
    assert sizes(auto_sizes(g, {"CPU": 32, "GPU": 4}, None))["inpainter"] == (3, None, None)
    assert sizes(auto_sizes(g, {"CPU": 32, "GPU": 4}, {"CPU": 256, "GPU": 16}))["inpainter"] == (None, 3, 15)
    explicit = load_config(overrides=[*gpu, "stream.inpainter.size=2", "stream.captioner.min_size=1",
                                      "stream.captioner.max_size=2"]).stream
    out = sizes(auto_sizes(explicit, {"CPU": 32, "GPU": 4}, {"CPU": 256, "GPU": 16}))
    assert out["inpainter"] == (2, None, None) and out["captioner"] == ("auto", 1, 2)


def test_gpu_fractions_are_declared_not_probed():
    args = actor_resources(StageConfig(batch_size=16, num_gpus=0.5, num_cpus=1))
    assert (args["batch_size"], args["num_gpus"], args["num_cpus"]) == (16, 0.5, 1)
    assert actor_resources(StageConfig())["num_gpus"] is None  # CPU actors ask for no GPU at all


def _connections(process):
    try:
        return process.net_connections(kind="tcp")
    except psutil.Error:  # the process ended meanwhile
        return []


def test_local_ray_stays_on_loopback_with_token_auth(local_ray):
    addresses = {node["NodeManagerAddress"] for node in local_ray.nodes()}
    assert addresses == {"127.0.0.1"}
    gcs_host = local_ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    assert gcs_host == "127.0.0.1"
    # Every socket that the processes this session started (Ray's, and the report page tests'
    # chromedriver) listen on is on loopback, IPv4 or IPv6.
    listening = {conn.laddr.ip for child in psutil.Process().children(recursive=True)
                 for conn in _connections(child) if conn.status == psutil.CONN_LISTEN}
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening
    assert os.environ.get("RAY_AUTH_MODE") != "disabled"
    # Written by this session's Ray (the tests' home starts empty) because token auth is on.
    assert Path.home().name.startswith("blipinpaint-home-")
    assert (Path.home() / ".ray" / "auth_token").is_file()
