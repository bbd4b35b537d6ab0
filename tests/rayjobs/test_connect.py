"""Where a job's Ray comes from when no address is given."""

import os
import subprocess
import sys

import pytest

PROBE = ("import ray; from rayjobs.cluster import connect; connect(); "
         "print('GCS', ray.get_runtime_context().gcs_address)")


@pytest.mark.parametrize("address", [None, "cluster"])
def test_a_job_without_an_address_starts_its_own_ray_and_never_joins_another(spot_cluster, address):
    """With no `ray_address` and no $RAY_ADDRESS a job starts a Ray of its own on loopback,
    as documented, even while another Ray runs on the machine (the spot cluster, which
    Ray's own lookup in /tmp/ray/ray_current_cluster would join); given the address, it
    joins that one."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address:
        env["RAY_ADDRESS"] = spot_cluster.address
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    gcs = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("GCS"))
    assert (gcs == spot_cluster.address) == bool(address), (gcs, spot_cluster.address)
    assert gcs.startswith("127.0.0.1:")
