"""Files and folders on a local disk or an object store (`s3://`, `gs://`, `file://`), one API.

Every output of a run lives below `run_dir`, which on a cluster is a bucket: jobs write
through pyarrow filesystems, and model folders (which `from_pretrained` can only read
from a local disk) are copied up after saving and down before loading.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

from pyarrow import fs as pafs

_LOCAL = pafs.LocalFileSystem()


@functools.lru_cache(maxsize=16)
def _remote(scheme_and_bucket: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(scheme_and_bucket)[0]  # one client per bucket and process


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path within it, for a local path or a URI."""
    if not is_remote(uri):
        return _LOCAL, posixpath.abspath(uri.removeprefix("file://"))
    scheme, path = uri.split("://", 1)
    return _remote(f"{scheme}://{path.split('/', 1)[0]}"), path  # s3: "bucket/key"


def _type(uri: str) -> pafs.FileType:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type


def is_file(uri: str) -> bool:
    return _type(uri) == pafs.FileType.File


def is_dir(uri: str) -> bool:
    return _type(uri) == pafs.FileType.Directory


def exists(uri: str) -> bool:
    return _type(uri) != pafs.FileType.NotFound


def write_text(uri: str, text: str) -> None:
    """Write a whole file, creating its folder."""
    fs, path = filesystem(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def digest(uri: str) -> str:
    """SHA-256 of a file's bytes (e.g. a model's weights, to tell two trainings apart)."""
    fs, path = filesystem(uri)
    sha = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def read_jsonl(uri: str) -> list[dict]:
    if not is_file(uri):
        return []
    return [json.loads(line) for line in read_text(uri).splitlines() if line.strip()]


def write_jsonl(uri: str, records: list[dict]) -> None:
    """Rewrite the whole log: works the same on local disks and object stores (no appends)."""
    write_text(uri, "".join(json.dumps(r) + "\n" for r in records))


def upload_dir(local: str | Path, uri: str) -> None:
    """Copy a local folder's files to `uri` (a no-op when that is the folder itself)."""
    fs, path = filesystem(uri)
    if fs is _LOCAL and Path(path).resolve() == Path(local).resolve():
        return
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=_LOCAL, destination_filesystem=fs)


def local_dir(uri: str) -> str:
    """A local folder holding `uri`'s files: the folder itself, or a per-node cached download.

    The download lands in a temporary folder renamed into place, so actors on one node
    that ask at once never read a half-copied model.
    """
    if not is_remote(uri):
        return filesystem(uri)[1]
    cache = Path(os.environ.get("BLIPINPAINT_CACHE", Path.home() / ".cache" / "blipinpaint")) / "remote"
    target = cache / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if not target.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache))
        fs, path = filesystem(uri)
        pafs.copy_files(path, str(staging), source_filesystem=fs, destination_filesystem=_LOCAL)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)
