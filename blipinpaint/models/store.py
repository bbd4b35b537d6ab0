"""The run's model store: each pinned checkpoint fetched once, verified, kept as safetensors.

Workers never reach for the hub. Before any actor loads a model, `put` runs once per
checkpoint on the job's driver: it fetches the files the ref names at its pinned commit
through huggingface_hub's cache, checks each against the hash the hub lists for it (its
cache blob is named by it), keeps safetensors and configs as they are and converts a
pickle with `torch.load(weights_only=True)`, and writes the folder to
`<store>/<repo>/<revision>/` with its manifest `_store.json` last: an entry without it is
incomplete and is redone. Workers then load that folder like any local checkpoint.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from blipinpaint.errors import JobError
from blipinpaint.models.offline import cache_root
from blipinpaint.models.presets import ModelRef, is_inception_weights_file, is_standard_inception
from blipinpaint.storage import filesystem, is_file, is_published, is_remote, read_text, upload_dir, write_text

log = logging.getLogger(__name__)

MANIFEST = "_store.json"
COMMIT = re.compile(r"[0-9a-f]{40}")
PICKLE_SUFFIXES = (".bin", ".pth", ".pt")
TEXT_SUFFIXES = (".json", ".txt", ".model")  # configs, vocabularies, sentencepiece models
VARIANT = re.compile(r"\.(fp16|bf16)(?=\.[a-z]+$)")  # `x.fp16.safetensors` -> `x.safetensors`


class StoreError(JobError):
    """A checkpoint that cannot be fetched, verified or converted: the job stops before any actor."""


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_ref(ref: ModelRef) -> bool:
    """A hub id (`org/name`), as opposed to a local folder, a folder URI (`s3://...`) or the FID Inception.

    A path that does not exist and is not shaped `org/name` is none of these: the loader
    then says it is not a folder, rather than the store calling it an unpinned hub id.
    """
    name = ref.name_or_path
    return bool(HUB_ID.fullmatch(name)) and not Path(name).exists()


@dataclass(frozen=True)
class Source:
    """Where a stored checkpoint comes from, and how its files get into the store."""

    folder: str  # the entry's folder below the store's root: named by what pins it, so entries never change
    record: dict  # what the entry's manifest says it holds
    fill: Callable[[Path], dict]  # writes the entry's files into a folder; returns their record


def source_of(ref: ModelRef, downloads: Path | None = None) -> Source | None:
    """What `ref` names, the one place that tells: a hub id at a pinned commit, the standard
    FID Inception (a pickle at a pinned URL, fetched into `downloads`), a file of FID
    Inception weights (torch-fidelity's `.pth`, checked against its pinned sha256 or the one
    `ref.revision` names), or None for a local folder, which is loaded as it is."""
    if is_standard_inception(ref) or is_inception_weights_file(ref):
        from blipinpaint.models import fid_store  # it builds on this module's entries

        return fid_store.source_of(ref, downloads or cache_root() / "downloads")
    if is_hub_ref(ref):
        return Source(f"{ref.name_or_path.replace('/', '--')}/{ref.revision}",
                      {"repo": ref.name_or_path, "revision": ref.revision, "files": list(ref.files or [])},
                      lambda staging: convert(*fetch(ref), staging))
    return None


def needs_store(ref: ModelRef) -> bool:
    return source_of(ref) is not None


def entry_uri(store: str, ref: ModelRef) -> str:
    """Where a checkpoint lives in the store."""
    return f"{store.rstrip('/')}/{source_of(ref).folder}"


def in_store(ref: ModelRef, store: str) -> ModelRef:
    """The ref a worker loads: a stored checkpoint's store folder, else `ref` itself."""
    return ModelRef(entry_uri(store, ref)) if needs_store(ref) else ref


def is_complete(uri: str) -> bool:
    """An entry whose manifest was written last; in a bucket also the folder's content
    manifest (`storage.upload_dir`), which node copies are verified against."""
    return is_file(f"{uri}/{MANIFEST}") and (not is_remote(uri) or is_published(uri))


def manifest(uri: str) -> dict:
    return json.loads(read_text(f"{uri}/{MANIFEST}"))


def git_blob_sha1(path: Path) -> str:
    """The id git gives a file's content: sha1 of `blob <size>\\0` + content."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    return _update(digest, path)


def sha256(path: Path) -> str:
    return _update(hashlib.sha256(), path)


def _update(digest, path: Path) -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_cached(path: Path) -> str:
    """Check a file of the hub cache against the hub's id for it (its blob's name); return that id.

    huggingface_hub names each blob by the ETag the hub serves: the sha256 of an LFS
    file's content, the git blob sha1 of any other file. The commit pins the tree, the
    tree pins these ids, so a file that matches its id is the file the commit names.
    """
    blob = Path(os.path.realpath(path))
    if blob.parent.name != "blobs" or len(blob.name) not in (40, 64):
        raise StoreError(f"{path} is not a blob of the hub cache: nothing to verify it against")
    actual = sha256(blob) if len(blob.name) == 64 else git_blob_sha1(blob)
    if actual != blob.name:
        raise StoreError(f"{path}: content hash {actual} differs from the hub's {blob.name} (corrupt or altered)")
    return actual


def fetch(ref: ModelRef) -> tuple[Path, list[str]]:
    """The snapshot folder of `ref` at its pinned commit with the files it names, and their paths."""
    from huggingface_hub import snapshot_download  # only the driver's model step needs it

    if not ref.revision or not COMMIT.fullmatch(ref.revision):
        raise StoreError(f"model {ref.name_or_path!r}: revision {ref.revision!r} is not a pinned commit "
                         "(40 hex digits); a branch or tag could change under the run")
    if not ref.files:
        raise StoreError(f"model {ref.name_or_path!r}: no files named (ModelRef.files)")
    try:
        folder = Path(snapshot_download(ref.name_or_path, revision=ref.revision, allow_patterns=list(ref.files)))
    except (OSError, ValueError) as err:  # huggingface_hub's errors: not found, offline, network, auth
        raise StoreError(f"model {ref.name_or_path}@{ref.revision} cannot be fetched: "
                         f"{type(err).__name__}: {str(err).splitlines()[0]}") from err
    if folder.name != ref.revision:
        raise StoreError(f"model {ref.name_or_path!r}: the hub gave commit {folder.name}, not {ref.revision}")
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    chosen = []
    for pattern in ref.files:
        matched = [p for p in present if fnmatch.fnmatchcase(p, pattern)]
        if not matched:
            raise StoreError(f"model {ref.name_or_path}@{ref.revision} has no file {pattern!r}")
        chosen += [p for p in matched if p not in chosen]
    return folder, chosen


def stored_name(name: str) -> str:
    """The file's name in the store: no variant; a pickle's weights under safetensors' name."""
    name = VARIANT.sub("", name)
    if name.endswith(PICKLE_SUFFIXES):
        folder, file = os.path.split(name)
        stem = file.rsplit(".", 1)[0]
        name = os.path.join(folder, ("model" if stem == "pytorch_model" else stem) + ".safetensors")
    return name


def pickle_to_safetensors(source: Path, target: Path, check: Callable[[dict], list[str]] | None = None) -> None:
    """A pickled state dict as safetensors; unpickled with `weights_only=True` (never runs code).
    `check(state)` names what makes the state dict unfit (nothing is written then)."""
    try:
        # No mmap: it needs torch's zip format, which pickles saved before torch 1.6 lack.
        state = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise StoreError(f"{source.name} holds objects other than tensors; refused unread: "
                         f"{str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StoreError(f"{source.name} is not a flat state dict of tensors")
    problems = check(state) if check else []
    if problems:
        raise StoreError(f"{source}: {'; '.join(problems)}")
    # Tied weights share storage in a pickle; safetensors stores each tensor on its own.
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(target), metadata={"format": "pt"})


def convert(folder: Path, files: list[str], out: Path) -> dict[str, dict]:
    """Verify each of `files` (under `folder`) and write it to `out` in the store's form."""
    record = {}
    for name in files:
        source = folder / name
        if name.endswith(".bin.index.json"):
            raise StoreError(f"{name}: a sharded pickle checkpoint; the store converts single-file pickles only")
        verified = verify_cached(source)
        target = out / stored_name(name)
        if target.exists():
            raise StoreError(f"{name} and another file both become {stored_name(name)}: "
                             "name only one of them in ModelRef.files")
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors") or name.endswith(TEXT_SUFFIXES):
            shutil.copyfile(source, target)
            how = "copied"
        elif name.endswith(PICKLE_SUFFIXES):
            pickle_to_safetensors(source, target)
            how = "pickle converted to safetensors (torch.load weights_only=True)"
        else:
            raise StoreError(f"{name}: the store keeps safetensors, configs and tokenizer files; "
                             "leave this file out of ModelRef.files")
        record[stored_name(name)] = {"from": name, "hub_id": verified, "how": how, "sha256": sha256(target)}
    return record


def download(url: str, expected_sha256: str, directory: Path) -> Path:
    """A file from a pinned URL into `directory`, kept only if its sha256 is the expected one."""
    return keep_checked(directory, expected_sha256, lambda: urllib.request.urlopen(url, timeout=60),
                         lambda actual: f"{url}: sha256 {actual} is not the pinned {expected_sha256}")


def keep_checked(directory: Path, expected_sha256: str, open_stream, mismatch: Callable[[str], str]) -> Path:
    """`directory/<expected_sha256>`: found there, or the stream's bytes once their sha256 is
    the expected one (else a StoreError, `mismatch(actual sha256)`, and nothing kept)."""
    target = directory / expected_sha256
    if target.is_file() and sha256(target) == expected_sha256:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=directory, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f, open_stream() as stream:
            shutil.copyfileobj(stream, f, length=1 << 24)
        actual = sha256(Path(partial))
        if actual != expected_sha256:
            raise StoreError(mismatch(actual))
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def _existing(uri: str, source: dict) -> dict | None:
    """The complete entry at `uri` if there is one; an entry made from another source is an error."""
    if not is_complete(uri):
        return None
    existing = manifest(uri)
    if existing["source"] != source:
        raise StoreError(f"{uri} holds {existing['source']}, not {source}: use another models.store")
    return {**existing, "reused": True}


def _publish(uri: str, source: dict, make) -> dict:
    """Stage the entry (`make(folder) -> files record`) and publish it with its manifest.

    On a disk the staged folder, manifest included, is renamed into place: drivers filling
    one store at once never see (or let workers load) a half-written entry, and the one
    that loses the race keeps the winner's. In a bucket each object appears whole, and
    the manifest goes last.
    """
    remote = is_remote(uri)
    target = None if remote else Path(filesystem(uri)[1])
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=None if remote else target.parent))
    try:
        entry = {"source": source, "files": make(staging)}
        text = json.dumps(entry, indent=2)
        if remote:
            upload_dir(staging, uri)
            write_text(f"{uri}/{MANIFEST}", text)  # last: the entry is complete
        else:
            (staging / MANIFEST).write_text(text)
            if target.exists() and not is_complete(uri):
                shutil.rmtree(target)  # an entry left incomplete
            try:
                os.rename(staging, target)
            except OSError:
                if not is_complete(uri):
                    raise
                return _existing(uri, source)  # another driver published it first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**entry, "reused": False}


def put(ref: ModelRef, uri: str, source: Source | None = None) -> dict:
    """Fill the store entry `uri` with `ref`'s checkpoint (`source`, default `source_of(ref)`),
    unless it is complete already."""
    source = source or source_of(ref)
    existing = _existing(uri, source.record)
    if existing is not None:
        return existing
    entry = _publish(uri, source.record, source.fill)
    log.info("model store: %s -> %s (%d files)", ref.name_or_path, uri, len(entry["files"]))
    return entry
