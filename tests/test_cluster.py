"""cluster.yaml: valid for Ray's launcher (offline), pinned, and closed by default."""

import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_accepts_the_config(cluster):
    validate_config(prepare_config(cluster))


def _start_commands(cluster):
    return cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]


def test_token_auth_on_every_node_and_dashboard_on_localhost(cluster):
    starts = [c for c in _start_commands(cluster) if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    head = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head and "--num-cpus=0" in head
    assert "0.0.0.0" not in yaml.safe_dump(cluster)
    assert cluster["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_only_ssh_is_open_and_only_to_one_address(cluster):
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    assert all(ip["CidrIp"].endswith("/32") for r in rules for ip in r["IpRanges"])


def test_installs_are_pinned_and_ray_is_the_tested_release(cluster):
    install = " ".join(c for c in cluster["setup_commands"] if "pip install" in c)
    packages = re.findall(r'"([A-Za-z0-9_.\-\[\],]+)(==|>=|~=|<)?([^"]*)"', install)
    assert packages and all(op == "==" for _, op, _ in packages), packages
    assert f"ray[data,train,default]=={ray.__version__}" in install


def test_workers_scale_from_zero(cluster):
    for name, node in cluster["available_node_types"].items():
        assert node["min_workers"] == 0, name
    assert cluster["idle_timeout_minutes"] > 0
    inference = cluster["available_node_types"]["gpu_inference"]["node_config"]
    assert inference["InstanceMarketOptions"]["MarketType"] == "spot"


def git(*args: str) -> list[str]:
    """The lines of a git command run in the repository (a test that needs git fails without it)."""
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr.strip()} (these tests need a git checkout)"
    return [line for line in done.stdout.split("\n") if line]


def tracked(*pathspecs: str) -> list[str]:
    """Paths in git's index (what is committed, or will be): an untracked or ignored file in the
    working tree is not one of them, and a tracked file deleted from the tree still is."""
    return sorted(git("ls-files", "--", *pathspecs))


def is_token(path: str) -> bool:
    """Ray's token file: `ray start` writes `~/.ray/auth_token`, cluster.yaml mounts it on the nodes."""
    return PurePosixPath(path).name.startswith("auth_token")


def test_no_token_is_committed():
    """Neither in the index nor in any commit behind HEAD: a token removed from the tree but
    committed once still ships with every clone."""
    assert not [p for p in tracked() if is_token(p)]
    assert not [p for p in git("log", "HEAD", "--format=", "--name-only", "--no-renames") if is_token(p)]


SHIPPED_CONFIGS = tracked(":(glob)configs/*.yaml")
JOBS = ["pipeline", "models", "generate", "candidates", "train_scorer", "finetune_blip", "evaluate", "export", "audit"]


@pytest.mark.parametrize("path", SHIPPED_CONFIGS)
def test_shipped_configs_load_and_validate(path):
    from blipinpaint.config import load_config

    cfg = load_config(ROOT / path)  # a tracked config missing from the checkout fails here
    assert cfg.run_dir.startswith("s3://") and cfg.models.preset == "paper" and cfg.models.dtype == "fp16"


def test_every_config_the_docs_name_is_shipped():
    """The README, the docs and the jobs' docstrings tell users to run `--config configs/<name>.yaml`:
    each one they name is tracked (so validated above), not only present in one working tree."""
    import importlib

    docs = [(ROOT / path).read_text() for path in ["README.md", *tracked(":(glob)docs/*.md")]]
    docs += [importlib.import_module(f"rayjobs.{job}").__doc__ for job in JOBS]
    named = {name for doc in docs for name in re.findall(r"configs/[\w.-]+\.yaml", doc)}
    assert named, "the README names no config"
    assert named <= set(SHIPPED_CONFIGS), sorted(named - set(SHIPPED_CONFIGS))


@pytest.mark.parametrize("job", JOBS)
def test_each_job_gives_its_exact_submit_command(job):
    """A job's docstring gives its `ray job submit` command as the cluster guide gives it
    (runtime env included), and points to the guide for the rest (tunnel, token, logs, stop)."""
    import importlib

    doc = " ".join(importlib.import_module(f"rayjobs.{job}").__doc__.replace("\\\n", " ").split())
    guide = " ".join((ROOT / "docs" / "cluster.md").read_text().replace("\\\n", " ").split())
    runtime_env = re.search(r"--runtime-env-json '[^']+'", guide).group(0)
    submit = "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir ."
    assert f"{submit} {runtime_env} -- python -m rayjobs.pipeline --config configs/paper-coco.yaml" in guide
    assert f"{submit} {runtime_env} -- python -m rayjobs.{job} --config configs/paper-coco.yaml" in doc, job
    assert "docs/cluster.md" in doc, job


def test_the_cluster_guide_gives_the_whole_cycle():
    """The one place the cluster's commands are written in full: up, the tunnel, submit, logs, stop, down."""
    guide = (ROOT / "docs" / "cluster.md").read_text()
    for line in ("ray up --yes cluster.yaml", "ray dashboard cluster.yaml &",
                 "RAY_AUTH_MODE=token ray job logs --address http://127.0.0.1:8265 --follow <submission id>",
                 "RAY_AUTH_MODE=token ray job stop --address http://127.0.0.1:8265 <submission id>",
                 "ray down cluster.yaml"):
        assert line in guide, line
