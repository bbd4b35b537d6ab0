"""Files and folders on a local disk or an object store (`s3://`, `gs://`, `file://`), one API.

Every output of a run lives below `run_dir`, which on a cluster is a bucket: jobs write
through pyarrow filesystems, and model folders (which `from_pretrained` can only read
from a local disk) are copied up after saving and down before loading.

A published folder carries a manifest, `_manifest.json`, written after its files: each
file's name, size and sha256. The manifest is the folder's content: the sha256 of its
bytes is the folder's digest (`folder_digest`), and a node keeps its copy of a bucket
folder under that digest, checked against the manifest when made. A folder retrained in
place gets a new manifest, hence a new copy; a folder without one is incomplete.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import shutil
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyarrow import fs as pafs

from blipinpaint.errors import JobError

_LOCAL = pafs.LocalFileSystem()
MANIFEST = "_manifest.json"  # a folder's content, written last (the model store's own is `_store.json`)
MANIFEST_FORMAT = "blipinpaint.folder/1"
_CHUNK = 1 << 24  # 16 MiB: on S3 each read of a stream is a ranged GET
_THREADS = 8  # files copied at once (I/O and hashing release the GIL)


class FolderError(JobError):
    """A folder whose content cannot be trusted: no manifest, or files that differ from it."""


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


def delete(uri: str) -> None:
    """Delete a file if it is there."""
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def move_aside(uri: str, suffix: str) -> str | None:
    """Move the folder `uri` to `<uri>.<suffix>` and return that, or None when there is no
    folder: old outputs are kept, never deleted. On a disk a rename; in a bucket each object
    is copied and then the folder deleted (a cut-short move leaves both, never neither)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    target = f"{path.rstrip('/')}.{suffix}"
    if fs.get_file_info(target).type != pafs.FileType.NotFound:
        raise FileExistsError(f"{target} exists already: cannot move {uri} aside")
    if fs is _LOCAL:
        os.rename(path, target)
    else:
        pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(path)
    return f"{uri.rstrip('/')}.{suffix}"


def read_jsonl(uri: str) -> list[dict]:
    if not is_file(uri):
        return []
    return [json.loads(line) for line in read_text(uri).splitlines() if line.strip()]


def write_jsonl(uri: str, records: list[dict]) -> None:
    """Rewrite the whole log: works the same on local disks and object stores (no appends)."""
    write_text(uri, "".join(json.dumps(r) + "\n" for r in records))


def _files_below(folder: Path) -> list[str]:
    """The relative paths of a local folder's files, its manifest left out."""
    return sorted(name for name in (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                  if name != MANIFEST)


def _copy(source: tuple[pafs.FileSystem, str], target: tuple[pafs.FileSystem, str] | None = None) -> dict:
    """Read one file (copying it to `target`, if given), hashing the bytes as they pass: their size and sha256."""
    fs, path = source
    if target is not None and target[0] is _LOCAL:
        os.makedirs(posixpath.dirname(target[1]), exist_ok=True)
    sha, size = hashlib.sha256(), 0
    with (fs.open_input_stream(path) as f,
          target[0].open_output_stream(target[1]) if target else contextlib.nullcontext() as out):
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
            if out is not None:
                out.write(chunk)
    return {"sha256": sha.hexdigest(), "size": size}


def _map(function, names: list[str]) -> dict[str, dict]:
    """`{name: function(name)}`, several files at once; the first error is raised after all end."""
    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS, len(names)))) as pool:
        return dict(zip(names, pool.map(function, names)))


def manifest_bytes(files: dict[str, dict]) -> bytes:
    """A manifest's text: the same files give the same bytes, hence the same digest."""
    entries = {name: {"sha256": r["sha256"], "size": r["size"]} for name, r in files.items()}
    return (json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1, sort_keys=True) + "\n").encode()


def _write_last(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a file that appears whole: an object store's PUT is; on a disk, a rename is."""
    if fs is not _LOCAL:
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    fd, partial = tempfile.mkstemp(dir=posixpath.dirname(path), prefix=f".{posixpath.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def upload_dir(local: str | Path, uri: str) -> None:
    """Publish a local folder's files at `uri`, its manifest last (the folder is whole from then on).

    A manifest already at `uri` is removed first: while the new files are written the
    folder reads as incomplete, never as the old content. Files at `uri` that `local`
    lacks stay there but are not part of the folder. `uri` may be the folder itself: then
    only its manifest is written.
    """
    source = Path(local)
    if not source.is_dir():
        raise NotADirectoryError(f"{local} is not a folder")
    fs, path = filesystem(uri)
    names = _files_below(source)
    if fs is _LOCAL and Path(path).resolve() == source.resolve():
        files = _map(lambda name: _copy((_LOCAL, str(source / name))), names)
    else:
        if fs.get_file_info(f"{path}/{MANIFEST}").is_file:
            fs.delete_file(f"{path}/{MANIFEST}")
        fs.create_dir(path, recursive=True)
        files = _map(lambda name: _copy((_LOCAL, str(source / name)), (fs, f"{path}/{name}")), names)
    _write_last(fs, f"{path}/{MANIFEST}", manifest_bytes(files))


def is_published(uri: str) -> bool:
    """Whether the folder at `uri` is whole: its manifest, written last, is there."""
    return is_file(f"{uri.rstrip('/')}/{MANIFEST}")


def _incomplete(uri: str) -> FolderError:
    return FolderError(
        f"{uri} has no {MANIFEST}: the folder is incomplete (an upload cut short or under way) or was not "
        "written by blipinpaint.storage.upload_dir (written before folders had manifests, or copied by hand), "
        "so nothing says what its files should be. A trained model (run_dir/scorer, run_dir/blip): delete the "
        "folder and train again. A model store entry: delete it and run python -m rayjobs.models again. A folder "
        f"copied by hand: python -c \"from blipinpaint.storage import write_manifest; write_manifest('{uri}')\"")


def _safe_name(name: object) -> bool:
    """A relative path that stays inside the folder (a manifest names files to write on a node)."""
    return (isinstance(name, str) and name != MANIFEST and not name.startswith("/") and "\\" not in name
            and all(part not in ("", ".", "..") for part in name.split("/")))


def _parse(data: bytes, where: str) -> dict[str, dict]:
    """The files a manifest lists, each `{"sha256", "size"}`; anything else is a FolderError."""
    try:
        manifest = json.loads(data)
        files = manifest["files"] if manifest.get("format") == MANIFEST_FORMAT else None
    except (ValueError, AttributeError, KeyError):
        files = None
    if not isinstance(files, dict):
        raise FolderError(f"{where} is not a {MANIFEST_FORMAT} manifest: publish the folder again (upload_dir)")
    for name, record in files.items():
        sha = record.get("sha256") if isinstance(record, dict) else None
        size = record.get("size") if isinstance(record, dict) else None
        if not (_safe_name(name) and isinstance(sha, str) and len(sha) == 64
                and all(c in "0123456789abcdef" for c in sha) and type(size) is int and size >= 0):
            raise FolderError(f"{where}: entry {name!r}: {record!r} is not a file inside the folder with its "
                              "size and sha256: publish the folder again (upload_dir)")
    return files


def _read_manifest(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            return f.read()
    except FileNotFoundError:
        raise _incomplete(uri) from None


def _differs(uri: str, name: str, actual: dict, expected: dict) -> FolderError:
    return FolderError(
        f"{uri}/{name}: {actual['size']} bytes with sha256 {actual['sha256']}, but the folder's {MANIFEST} lists "
        f"{expected['size']} bytes with sha256 {expected['sha256']}: the files changed after the manifest was "
        "written (or an upload is under way). Publish the folder again, or delete it and rerun the job that "
        "writes it.")


def folder_digest(uri: str) -> str:
    """The content digest of a folder (a path or a URI): the sha256 of its manifest.

    Two folders with the same files have the same digest, wherever they are. A bucket
    folder's digest is read from its manifest (its node copies are checked against it). A
    local folder is hashed: with a manifest, each file it lists is checked against it; without
    one, the digest is that of the manifest `upload_dir` would write for it.
    """
    fs, path = filesystem(uri)
    if fs is not _LOCAL:
        data = _read_manifest(uri)
        _parse(data, f"{uri}/{MANIFEST}")
        return hashlib.sha256(data).hexdigest()
    folder = Path(path)
    if not folder.is_dir():
        raise NotADirectoryError(f"{uri} is not a folder")
    if not (folder / MANIFEST).is_file():
        files = _map(lambda name: _copy((_LOCAL, str(folder / name))), _files_below(folder))
        return hashlib.sha256(manifest_bytes(files)).hexdigest()
    data = (folder / MANIFEST).read_bytes()
    expected = _parse(data, str(folder / MANIFEST))
    _check(uri, expected, lambda name: _copy((_LOCAL, str(folder / name))))
    return hashlib.sha256(data).hexdigest()


def _check(uri: str, expected: dict[str, dict], actual_of) -> dict[str, dict]:
    """Each listed file's record (`actual_of(name)`), all of them the manifest's, else a FolderError."""
    def one(name: str) -> dict:
        try:
            actual = actual_of(name)
        except FileNotFoundError:
            raise FolderError(f"{uri}/{name} is listed in the folder's {MANIFEST} but missing: publish the "
                              "folder again, or delete it and rerun the job that writes it") from None
        if actual != expected[name]:
            raise _differs(uri, name, actual, expected[name])
        return actual

    return _map(one, sorted(expected))


def write_manifest(uri: str) -> str:
    """Write the manifest of a folder whose files are there already (e.g. copied to a bucket by
    hand), from their bytes as they are now; returns the folder's digest."""
    fs, path = filesystem(uri)
    if fs is _LOCAL:
        names = _files_below(Path(path))
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        names = sorted(n for n in (posixpath.relpath(i.path, path) for i in infos if i.is_file) if n != MANIFEST)
    if not names:
        raise FolderError(f"{uri} holds no files")
    data = manifest_bytes(_map(lambda name: _copy((fs, f"{path}/{name}")), names))
    _write_last(fs, f"{path}/{MANIFEST}", data)
    return hashlib.sha256(data).hexdigest()


def _cache() -> Path:
    return Path(os.environ.get("BLIPINPAINT_CACHE", Path.home() / ".cache" / "blipinpaint")) / "folders"


_STAGING = ".staging-"


def _staging_prefix() -> str:
    return f"{_STAGING}{socket.gethostname()}-{os.getpid()}-"


def _remove_abandoned(cache: Path) -> None:
    """Remove the staging folders of this host's processes that died mid-copy (killed: no
    `finally` ran). A live process's, and another host's (a shared disk), are left alone."""
    mine = f"{_STAGING}{socket.gethostname()}-"
    for entry in cache.glob(f"{mine}*"):
        try:
            pid = int(entry.name[len(mine):].split("-", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


def local_dir(uri: str) -> str:
    """A local folder holding `uri`'s files: the folder itself, or this node's copy of a bucket folder.

    The copy is named by the folder's digest (its manifest's sha256; one small read) and
    made once: each file is checked against the manifest as it arrives, in a staging folder
    renamed into place only when whole. A name in the cache is therefore a complete,
    verified copy of that content (reuse checks only the files' sizes), a failed copy leaves
    nothing, and actors on one node asking at once all get a whole copy. A folder retrained
    at `uri` has a new manifest: a new copy.
    """
    if not is_remote(uri):
        return filesystem(uri)[1]
    uri = uri.rstrip("/")
    data = _read_manifest(uri)
    expected = _parse(data, f"{uri}/{MANIFEST}")
    cache = _cache()
    target = cache / hashlib.sha256(data).hexdigest()
    if not target.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(cache)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(), dir=cache))
        try:
            fs, path = filesystem(uri)
            _check(uri, expected, lambda name: _copy((fs, f"{path}/{name}"), (_LOCAL, str(staging / name))))
            (staging / MANIFEST).write_bytes(data)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():
                    raise  # not another process finishing first
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _check_copy(target, expected)
    return str(target)


def _check_copy(copy: Path, expected: dict[str, dict]) -> None:
    """A node copy is checked in full when made; a reuse checks that each file is still there whole."""
    for name, record in expected.items():
        try:
            size = (copy / name).stat().st_size
        except FileNotFoundError:
            size = None
        if size != record["size"]:
            raise FolderError(f"this node's copy {copy} was altered after it was made: {name} is "
                              f"{'missing' if size is None else f'{size} bytes'}, not {record['size']}. "
                              "Delete that folder: the next load fetches it again.")
