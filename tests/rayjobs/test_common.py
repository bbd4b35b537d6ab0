import os
from pathlib import Path

import psutil

from blipinpaint.config import StageConfig
from rayjobs.common import actor_resources, pool


def test_fixed_and_autoscaling_pools():
    fixed = pool(StageConfig(size=3))
    assert (fixed.min_size, fixed.max_size) == (3, 3)
    scaling = pool(StageConfig(min_size=1, max_size=8))
    assert (scaling.min_size, scaling.max_size) == (1, 8)


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
    # Every socket that the Ray processes started by this session listen on is on loopback.
    listening = {conn.laddr.ip for child in psutil.Process().children(recursive=True)
                 for conn in _connections(child) if conn.status == psutil.CONN_LISTEN}
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    assert os.environ.get("RAY_AUTH_MODE") != "disabled"
    # Written by this session's Ray (the tests' home starts empty) because token auth is on.
    assert Path.home().name.startswith("blipinpaint-home-")
    assert (Path.home() / ".ray" / "auth_token").is_file()
