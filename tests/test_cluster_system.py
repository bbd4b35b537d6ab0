"""The cluster path for real: `ray start --head` on 127.0.0.1, then `ray job submit`.

Each test starts its own Ray head on 127.0.0.1 (free ports, a private temp dir) with the
README's commands, and stops it by ending exactly the processes that carry its temp dir:
`ray stop` would end every Ray of the user, the test session's own included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_processes(marker: str) -> list[int]:
    """PIDs whose command line names `marker` (every process of one Ray head names its temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


class Head:
    """One `ray start --head` of a test: loopback only, token auth on, its own temp dir."""

    def __init__(self, start_env: dict | None = None, args: tuple = ()):
        # A short path: Ray's Unix sockets live below it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="bi-ray-", dir="/tmp")
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # As a user with the venv active; the job driver and workers inherit it. A home of its
        # own, with no token in it: the README's first line must make the one Ray reads.
        self.home = os.path.join(self.temp_dir, "home")
        os.mkdir(self.home)
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "HOME": self.home}
        self.start_env, self.args = start_env or {}, args

    def ray(self, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env={**self.env, "RAY_AUTH_MODE": "token", **(env or {})},
                              cwd=ROOT, capture_output=True, text=True, **kwargs)

    def __enter__(self) -> Head:
        # Every port of its own: the test session's local Ray holds Ray's defaults (52365 for
        # the agent, 10001 for the client server...), and an agent that cannot bind never
        # registers, so the job API would answer "No available agent".
        ports = [f"--{name}-port={free_port()}" for name in
                 ("dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export", "runtime-env-agent",
                  "ray-client-server", "node-manager", "object-manager")]
        # The README's first line: the token made (once per home) before the head starts with
        # RAY_AUTH_MODE=token, which refuses to start without one.
        made = self.ray("get-auth-token", "--generate", timeout=60)
        assert made.returncode == 0, made.stderr
        os.chmod(os.path.join(self.home, ".ray", "auth_token"), 0o600)
        started = self.ray("start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                           f"--port={self.port}", f"--dashboard-port={self.dashboard_port}", *ports,
                           f"--temp-dir={self.temp_dir}", *self.args, env=self.start_env, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        return self

    def submit(self, *job_args: str, timeout: int = 420) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir .` as the README gives it, waiting for the end."""
        return self.ray("job", "submit", "--address", self.address, "--working-dir", ".",
                        "--", "python", "-m", *job_args, timeout=timeout)

    def listening(self) -> set[str]:
        """Addresses that this head's processes listen on."""
        addresses = set()
        for pid in own_processes(self.temp_dir):
            try:
                addresses |= {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="tcp")
                              if c.status == psutil.CONN_LISTEN}
            except psutil.Error:  # ended meanwhile
                continue
        return addresses

    def job_api_status(self, token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{self.address}/api/jobs/", headers=headers),
                                        timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of this head's Ray logs: why a submit failed lies there, not in the CLI's output."""
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        out = []
        for name in ("dashboard.log", "dashboard_agent.log", "raylet.out", "gcs_server.out"):
            if (logs / name).exists():
                out += [f"--- {name}", *(logs / name).read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(out)

    def __exit__(self, *exc) -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            for pid in own_processes(self.temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while own_processes(self.temp_dir) and time.time() < deadline:
                time.sleep(0.2)
        assert not own_processes(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def succeeded(result: subprocess.CompletedProcess, head: Head) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:] + "\n" + head.log_tails()
    return out


# Ray's fake multi-node provider starts "cloud" nodes as extra raylets on this machine. Through
# autoscaler v2 it matches them by node id (v1 matches by IP, and every node here is 127.0.0.1).
# Its defaults file is not in the Ray wheel, so it is loaded as an external provider module.
FAKE_HEAD_ID = "f" * 51 + "00000"
FAKE_START_ENV = {"RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                  "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_ID}


def fake_cluster_config(gcs_address: str) -> dict:
    """cluster.yaml's shape in small: a head that runs no work, GPU workers from 0 to 2."""
    return {
        "cluster_name": "blipinpaint-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "gcs_address": gcs_address, "head_node_id": FAKE_HEAD_ID, "launch_multiple": True},
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            # Logical GPUs: Ray schedules by them; the machine has no CUDA device behind them.
            "gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        # Required by the config preparation; nothing to install on a node of this machine.
        **{key: [] for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                               "initialization_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


def state(head: Head, kind: str) -> list[dict]:
    listed = head.ray("list", kind, "--format", "json", "--detail", f"--address=127.0.0.1:{head.port}", timeout=60)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def test_a_submitted_job_scales_a_closed_cluster_up_from_zero(model_cache, tmp_path):
    """README, "Running a job" on a fake autoscaling cluster: `ray start --head` on 127.0.0.1
    (with the fake provider's autoscaling config), then `ray job submit --working-dir .`;
    GPU-requesting pools start GPU workers, the job completes, and nothing listens beyond
    loopback or answers without the token."""
    config = tmp_path / "autoscaling.json"
    head = Head(start_env=FAKE_START_ENV)
    config.write_text(json.dumps(fake_cluster_config(f"127.0.0.1:{head.port}")))
    head.args = (f"--autoscaling-config={config}", "--num-cpus=0", "--num-gpus=0")
    run_dir = tmp_path / "run"
    with head:
        before = [n for n in state(head, "nodes") if n["state"] == "ALIVE"]
        assert [n["is_head_node"] for n in before] == [True], before
        # As on a real cluster, the pools ask for GPUs (one inpainter per GPU; BLIP and CLIP
        # half each). The nodes have no CUDA device, so this config computes on CPU in fp32.
        out = succeeded(head.submit(
            "rayjobs.generate", f"run_dir={run_dir}", "data.limit=4", "models.device=cpu", "models.dtype=fp32",
            "stream.inpainter.num_gpus=1", "stream.captioner.num_gpus=0.5", "stream.metrics.num_gpus=0.5",
            timeout=540), head)
        assert "4 inputs: 4 samples, 0 errors" in out and "succeeded" in out
        # Closed by default: the job API refuses a client without the token.
        token = (Path(head.home) / ".ray" / "auth_token").read_text().strip()
        assert head.job_api_status(None) == 401 and head.job_api_status(token) == 200
        workers = {n["node_id"]: n for n in state(head, "nodes") if n["state"] == "ALIVE" and not n["is_head_node"]}
        assert len(workers) == 2, workers  # 2 GPUs asked for: two 1-GPU workers
        assert all(n["resources_total"]["GPU"] == 1 for n in workers.values())
        model_actors = [a for a in state(head, "actors") if "MapWorker" in a["class_name"]]
        assert len(model_actors) >= 3 and all(a["node_id"] in workers for a in model_actors), model_actors
        assert head.listening() <= LOOPBACK, head.listening()
    stats = json.loads((run_dir / "generate" / "stats.json").read_text())
    assert (stats["ok"], stats["missing"], stats["duplicates"]) == (4, 0, 0)
    assert (run_dir / "generate" / "_SUCCESS").exists()
