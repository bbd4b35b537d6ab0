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

    def __init__(self, env_extra: dict | None = None, args: tuple = ()):
        # A short path: Ray's Unix sockets live below it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="bi-ray-", dir="/tmp")
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # As a user with the venv active; the job driver and workers inherit it.
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    **(env_extra or {})}
        self.args = args

    def ray(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env={**self.env, "RAY_AUTH_MODE": "token"},
                              cwd=ROOT, capture_output=True, text=True, **kwargs)

    def __enter__(self) -> Head:
        # Every port of its own: the test session's local Ray holds Ray's defaults (52365 for
        # the agent, 10001 for the client server...), and an agent that cannot bind never
        # registers, so the job API would answer "No available agent".
        ports = [f"--{name}-port={free_port()}" for name in
                 ("dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export", "runtime-env-agent",
                  "ray-client-server", "node-manager", "object-manager")]
        started = self.ray("start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                           f"--port={self.port}", f"--dashboard-port={self.dashboard_port}", *ports,
                           f"--temp-dir={self.temp_dir}", *self.args, timeout=180)
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


    def log_tails(self, lines: int = 15) -> str:
        """The last lines of this head's Ray logs: why a submit failed lies there, not in the CLI's output."""
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        out = []
        for name in ("dashboard.log", "dashboard_agent.log", "raylet.out", "gcs_server.out"):
            if (logs / name).exists():
                out += [f"--- {name}", *(logs / name).read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(out)


def succeeded(result: subprocess.CompletedProcess, head: Head) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:] + "\n" + head.log_tails()
    return out


def test_submit_generate_to_a_local_head(model_cache, tmp_path):
    """README, "Running a job": `ray start --head` on 127.0.0.1, then `ray job submit --working-dir .`."""
    run_dir = tmp_path / "run"
    with Head() as head:
        out = succeeded(head.submit("rayjobs.generate", f"run_dir={run_dir}"), head)
        assert "6 inputs: 6 samples, 0 errors" in out and "succeeded" in out
        # Closed by default: loopback only, and the job API refuses a client without the token.
        assert head.listening() <= LOOPBACK, head.listening()
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        assert head.job_api_status(None) == 401 and head.job_api_status(token) == 200
    stats = json.loads((run_dir / "generate" / "stats.json").read_text())
    assert (stats["ok"], stats["missing"], stats["duplicates"]) == (6, 0, 0)
    assert (run_dir / "generate" / "_SUCCESS").exists()

