"""Security properties as tests: safetensors only, no remote code, no public Ray endpoints
in any config of the repository, manifest paths confined to their root."""

import ast
import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from blipinpaint.models import ModelRef, get_preset, load_captioner, load_clip, load_inpaint_pipeline
from blipinpaint.sources import contained, list_inputs

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


class Trap:
    """Unpickling this creates `path`: proof that a pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def _pickled_copy(folder: Path, to: Path, marker: Path) -> Path:
    """`folder` with every safetensors file replaced by a pickle that would run code when loaded."""
    shutil.copytree(folder, to)
    for weights in list(to.rglob("*.safetensors")):
        name = "diffusion_pytorch_model.bin" if weights.name.startswith("diffusion_") else "pytorch_model.bin"
        weights.with_name(name).write_bytes(pickle.dumps({"weights": Trap(str(marker))}))
        weights.unlink()
    return to


@pytest.mark.parametrize("role, load", [("captioner", load_captioner), ("clip", load_clip),
                                        ("inpainter", load_inpaint_pipeline)])
def test_pickle_checkpoints_are_refused_unread(role, load, tmp_path):
    marker = tmp_path / "pickle-ran"
    folder = _pickled_copy(Path(getattr(get_preset("tiny"), role).name_or_path), tmp_path / role, marker)
    with pytest.raises((OSError, ValueError), match="safetensors"):
        load(ModelRef(str(folder)), CPU)
    assert not marker.exists()


def test_remote_code_in_a_checkpoint_is_never_run(tmp_path):
    """A folder whose tokenizer config points at custom code: loading it must not import it."""
    marker = tmp_path / "remote-code-ran"
    folder = tmp_path / "captioner"
    shutil.copytree(get_preset("tiny").captioner.name_or_path, folder)
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
                                    "from transformers import BertTokenizer\nclass Evil(BertTokenizer): pass\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.Evil", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    load_captioner(ModelRef(str(folder)), CPU)
    assert not marker.exists()
    # The trap is armed: a loader that trusted remote code would have run it.
    AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    assert marker.exists()


def _project_files(suffixes: tuple[str, ...]) -> list[Path]:
    """The project's own files (tracked, or new and not ignored), tests excluded: never a
    run's outputs or the virtual environment."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in listed.splitlines()
            if not line.startswith("tests/") and Path(line).suffix in suffixes and (REPO / line).is_file()]


def unsafe_calls(source: str) -> list[str]:
    """Calls that would run code from a checkpoint: trust_remote_code, unrestricted unpickling."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        given = {kw.arg: kw.value.value if isinstance(kw.value, ast.Constant) else kw.value for kw in node.keywords}
        name = ast.unparse(node.func)
        if given.get("trust_remote_code", False) is not False:
            found.append(f"{node.lineno}: trust_remote_code")
        if name.endswith("torch.load") and given.get("weights_only") is not True:
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        if name in ("pickle.load", "pickle.loads"):
            found.append(f"{node.lineno}: {name}")
    return found


def test_no_code_asks_for_remote_code_or_unsafe_unpickling():
    offenders = {str(p.relative_to(REPO)): unsafe_calls(p.read_text()) for p in _project_files((".py",))}
    assert not {path: calls for path, calls in offenders.items() if calls}
    bad = "m = X.from_pretrained(p, trust_remote_code=flag)\nsd = torch.load(f)\nsd = torch.load(f, weights_only=True)"
    assert unsafe_calls(bad) == ["1: trust_remote_code", "2: torch.load without weights_only=True"]


def _settings_text(path: Path) -> str:
    """What of a file can configure Ray: all of a script or config; of a Markdown page, its
    code blocks (the commands users copy), other lines blanked so line numbers hold."""
    text = path.read_text(errors="replace")
    if path.suffix != ".md":
        return text
    lines, inside = [], False
    for line in text.splitlines():
        fence = line.lstrip().startswith("```")
        lines.append(line if inside and not fence else "")
        inside ^= fence
    return "\n".join(lines)


LOOPBACK = ("127.0.0.1", "localhost")
# (what it finds, why it is refused)
EXPOSURES = [
    (re.compile(r"dashboard[-_]host\W+([\w.:\[\]]+)"), "the dashboard bound beyond localhost"),
    (re.compile(r"\b0\.0\.0\.0\b|\[::\]"), "a listener on every interface"),
    (re.compile(r"RAY_AUTH_MODE\W+(\w+)"), "token authentication switched off"),
    (re.compile(r"auth[-_]mode\W+(\w+)"), "token authentication switched off"),
]


def exposures(path: Path) -> list[str]:
    """`line: match (why)` for each setting in `path` that exposes Ray or switches auth off."""
    text, found = _settings_text(path), []
    for pattern, why in EXPOSURES:
        for match in pattern.finditer(text):
            value = match.group(1) if pattern.groups else match.group(0)
            if value.strip("'\"") not in (*LOOPBACK, "token"):
                found.append(f"{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)!r} ({why})")
    return found


def test_no_config_in_the_repo_exposes_ray_or_disables_token_auth():
    files = _project_files(("", ".py", ".yaml", ".yml", ".sh", ".md", ".toml", ".json"))
    assert not {str(p.relative_to(REPO)): e for p in files if (e := exposures(p))}
    # The scan sees what it must: the settings are there to be checked.
    cluster = (REPO / "cluster.yaml").read_text()
    assert "--dashboard-host=127.0.0.1" in cluster and "RAY_AUTH_MODE=token" in cluster
    assert "--dashboard-host=127.0.0.1" in _settings_text(REPO / "README.md")
    # Ray 2.60's `ray start` makes no token: with none, and RAY_AUTH_MODE unset, it starts open.
    readme = (REPO / "README.md").read_text()
    start = next(line for line in readme.splitlines() if "ray start --head" in line)
    made = readme.index("ray get-auth-token --generate > /dev/null && chmod 600 ~/.ray/auth_token")
    assert "RAY_AUTH_MODE=token" in start and made < readme.index(start)  # written 0644 by Ray: the owner's alone


def test_the_scan_catches_an_exposed_dashboard_and_disabled_auth(tmp_path):
    script = tmp_path / "start.sh"
    script.write_text("ray start --head --dashboard-host=0.0.0.0\nexport RAY_AUTH_MODE=disabled\n")
    assert exposures(script) == ["1: 'dashboard-host=0.0.0.0' (the dashboard bound beyond localhost)",
                                 "1: '0.0.0.0' (a listener on every interface)",
                                 "2: 'RAY_AUTH_MODE=disabled' (token authentication switched off)"]
    page = tmp_path / "page.md"  # prose may name what it forbids; its commands may not do it
    page.write_text("Never bind 0.0.0.0.\n\n```bash\nray start --head --dashboard-host=0.0.0.0\n```\n")
    assert [e.split(":")[0] for e in exposures(page)] == ["4", "4"]


ESCAPES = ["../secret.png", "a/../../secret.png", "/etc/passwd", "file:///etc/passwd", "s3://other-bucket/x.png",
           "//etc/passwd", "images-private/x.png", "bad\x00.png"]


@pytest.mark.parametrize("path", ESCAPES)
def test_manifest_paths_cannot_leave_the_image_root(tmp_path, path):
    root = tmp_path / "images"
    root.mkdir()
    # A sibling folder that shares the root's name as a prefix must not count as inside.
    escaped = path.replace("images-private", str(tmp_path / "images-private"))
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"id": ["x"], "path": [escaped]}), manifest)
    [item] = list_inputs(str(manifest), image_root=str(root))
    assert item["error"].startswith("bad path:"), item


def test_uri_roots_confine_paths_the_same_way():
    root = "s3://bucket/images"
    assert contained(root, "a/b.jpg") == "s3://bucket/images/a/b.jpg"
    for path in ("../other/x.jpg", "s3://bucket/images-private/x.jpg", "s3://other/images/x.jpg",
                 "/images/x.jpg", "a/../../x.jpg"):
        assert contained(root, path) is None, path


def test_a_tampered_training_checkpoint_is_refused_unread(tmp_path):
    """DeepSpeed's own loader would unpickle anything; ours loads weights only."""
    from rayjobs.training import WeightsOnlyCheckpointEngine

    marker, path = tmp_path / "pickle-ran", tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"state": {}}, "loss_scaler": Trap(str(marker))}, path)
    with pytest.raises(pickle.UnpicklingError):
        WeightsOnlyCheckpointEngine().load(str(path))
    assert not marker.exists()
    torch.save({"optimizer_state_dict": {"state": {0: torch.ones(2)}}}, path)
    assert WeightsOnlyCheckpointEngine().load(str(path))["optimizer_state_dict"]["state"][0].sum() == 2
