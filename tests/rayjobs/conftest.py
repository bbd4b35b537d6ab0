"""The embedded default run through the whole pipeline, shared by the tests that read it;
the simulated cluster of the node-loss tests."""

import contextlib
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


class SpotCluster:
    """A Ray cluster of several raylets on 127.0.0.1 (`ray.cluster_utils.Cluster`): a head with
    no CPU (where a job's driver attaches, as on a cluster whose head runs no work) and one
    worker node of 2 CPUs, which a test removes without grace, as a spot preemption does,
    and replaces. Next to the session's own Ray: jobs join it by `ray_address` in processes
    of their own, never from the test's process (already joined to the session's Ray).

    Its GCS checks each node's health every second and declares a node dead after 3 failed
    checks in a row (`HEALTH_CHECKS`): a removed node is known dead about 6 s after it went
    instead of Ray's default 17 s (checks every 3 s, 5 failures; measured here), and every
    node-loss test waits for that before its job can go on. A check still waits Ray's 10 s
    for an answer, so a live node on a loaded machine is not taken for dead."""

    HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}

    def __init__(self):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "object_store_memory": 200 * 1024**2, "_system_config": self.HEALTH_CHECKS})
        self.worker = self.add()
        self.lost = 0

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self):
        return self.cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", object_store_memory=200 * 1024**2)

    def lose_worker(self) -> None:
        """The worker node gone at once (its raylet, object store and workers), and a
        replacement joined, as an autoscaler brings one after a preemption.

        `remove_node` kills the node's own processes only: a worker busy in Python (a Ray
        Train rank in its loop) notices its raylet gone only at its next call to it, and
        went on training and writing for seconds. A preempted machine's processes end
        with it: every process the raylet started is killed too."""
        import psutil

        raylet = self.worker.all_processes["raylet"][0].process.pid
        workers = psutil.Process(raylet).children(recursive=True)
        self.cluster.remove_node(self.worker, allow_graceful=False)
        for process in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(workers, timeout=30)
        self.lost += 1
        self.worker = self.add()

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def spot_cluster(local_ray):
    """The node-loss tests' `SpotCluster`, started after the session's Ray (its workers see the
    same AWS variables and model cache); every raylet it started is ended with it."""
    cluster = SpotCluster()
    yield cluster
    cluster.shutdown()
