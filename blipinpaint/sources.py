"""Input listings: which images a run uses, each with a stable id derived from the source.

Kinds of source (`data.kind`, detected when `auto`):
- `folder`: every image file below a folder; the id is the path relative to it.
- `coco`: an MSCOCO annotations JSON (its `images` list); the id is `file_name`.
- `visualgenome`: VisualGenome's `image_data.json`; the id is `image_id`, the file is
  `<image root>/<last two parts of its url>` (`VG_100K/1.jpg`), as the download unpacks.
- `manifest`: a Parquet file with `id` and `path` columns.

Local paths and URIs (`s3://...`) both go through pyarrow's filesystems. Paths from an
annotations file or manifest must stay inside the image root: one that escapes it (`..`,
an absolute path or URI elsewhere) becomes an error row, never a read. The check is on
the path's text: links inside the root are followed, since whoever can place a link there
already controls the files.

A local file name that is not valid UTF-8 keeps its undecodable bytes spelled out in its
id (`caf\\xe9.png`) and is read through its raw bytes (`raw_path`): ids and Parquet
strings are UTF-8 text.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import PurePosixPath

import numpy as np
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from blipinpaint.seeds import sample_seed
from blipinpaint.storage import filesystem, is_remote

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
SOURCE_KINDS = ("auto", "folder", "coco", "visualgenome", "manifest")


class SourceError(ValueError):
    """The source as a whole cannot be listed (missing, unreadable, wrong format)."""


def _join(base: str, path: str) -> str:
    """`base` + `path` as a URI or local path, keeping the scheme of `base`."""
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    return posixpath.normpath(posixpath.join(posixpath.abspath(base), path))


def contained(root: str, path: str) -> str | None:
    """`path` resolved against `root`, or None when it points outside `root`."""
    root = _join(root, ".")
    full = path if ("://" in path or path.startswith("/")) else _join(root, path)
    full = _join(full, ".")  # normalise `..` in absolute paths too
    return full if full == root or full.startswith(root.rstrip("/") + "/") else None


def detect_kind(source: str) -> str:
    fs, path = filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"data.source {source!r} does not exist")
    if info.type == pafs.FileType.Directory:
        return "folder"
    if path.endswith(".parquet"):
        return "manifest"
    if path.endswith(".json"):
        head = _read_json(source)
        if isinstance(head, dict) and "images" in head:
            return "coco"
        if isinstance(head, list) and (not head or "image_id" in head[0]):
            return "visualgenome"
    raise SourceError(
        f"cannot tell what data.source {source!r} is: expected a folder, a COCO annotations .json, "
        "VisualGenome's image_data.json or a Parquet manifest; set data.kind"
    )


def _read_json(source: str):
    fs, path = filesystem(source)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot read {source!r} as JSON: {err}") from None


def _item(sample_id: str, source: str = "", error: str = "", raw_path: bytes = b"") -> dict:
    return {"id": sample_id, "source": source, "error": error, "raw_path": raw_path}


def _text(name: str) -> str:
    """A local file name as UTF-8 text: bytes that are not UTF-8 spelled out as `\\xNN`."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _walk_local(path: str) -> list[str]:
    """Relative paths of the files below a local folder; linked folders once each (no cycles)."""
    def fail(err: OSError):
        raise SourceError(f"cannot list image folder {path!r}: {err}")

    seen, found = set(), []
    for folder, subfolders, files in os.walk(path, onerror=fail, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        found += [os.path.relpath(os.path.join(folder, f), path) for f in files]
    return found


def list_folder(root: str) -> list[dict]:
    fs, path = filesystem(root)
    if not is_remote(root):
        if not os.path.isdir(path):
            raise SourceError(f"cannot list image folder {root!r}: not a folder")
        # os.walk, not pyarrow: pyarrow cannot list a name that is not UTF-8 at all.
        relatives = _walk_local(path)
    else:
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        except OSError as err:
            raise SourceError(f"cannot list image folder {root!r}: {err}") from None
        relatives = [posixpath.relpath(i.path, path) for i in infos if i.type == pafs.FileType.File]
    items = []
    for relative in relatives:
        if PurePosixPath(relative).suffix.lower() in IMAGE_EXTENSIONS:
            text = _text(relative)
            raw = os.fsencode(os.path.join(path, relative)) if text != relative else b""
            items.append(_item(text, _join(root, text), raw_path=raw))
    return _unique(items, root)


def _unique(items: list[dict], what: str) -> list[dict]:
    """A repeated id becomes an error row of its own, under a suffixed id no other input has,
    so every input is accounted for exactly once."""
    taken = {it["id"] for it in items}
    seen, out = set(), []
    for it in items:
        sample_id = it["id"]
        if sample_id not in seen:
            seen.add(sample_id)
            out.append(it)
            continue
        n = 2
        while f"{sample_id}#{n}" in taken:
            n += 1
        taken.add(f"{sample_id}#{n}")
        out.append(_item(f"{sample_id}#{n}", it["source"], f"duplicate id: {sample_id!r} repeats in {what}"))
    return out


def _from_pairs(pairs, root: str, what: str) -> list[dict]:
    """(id, path) pairs -> items; duplicate ids and paths outside `root` become error rows."""
    items = []
    for sample_id, path in pairs:
        sample_id, path = str(sample_id), str(path)
        resolved = contained(root, path)
        if "\x00" in path:
            items.append(_item(sample_id, path, f"bad path: {path!r} holds a NUL character"))
        elif resolved is None:
            items.append(_item(sample_id, path, f"bad path: {path!r} is outside the image root {root!r}"))
        else:
            items.append(_item(sample_id, resolved))
    return _unique(items, what)


def list_coco(annotations: str, root: str) -> list[dict[str, str]]:
    data = _read_json(annotations)
    try:
        pairs = [(img["file_name"], img["file_name"]) for img in data["images"]]
    except (KeyError, TypeError) as err:
        raise SourceError(f"{annotations!r} is not COCO annotations: missing {err}") from None
    return _from_pairs(pairs, root, annotations)


def list_visualgenome(image_data: str, root: str) -> list[dict[str, str]]:
    data = _read_json(image_data)
    try:
        pairs = [(img["image_id"], "/".join(str(img["url"]).rstrip("/").split("/")[-2:])) for img in data]
    except (KeyError, TypeError) as err:
        raise SourceError(f"{image_data!r} is not VisualGenome image data: missing {err}") from None
    return _from_pairs(pairs, root, image_data)


def list_manifest(manifest: str, root: str) -> list[dict[str, str]]:
    fs, path = filesystem(manifest)
    try:
        table = pq.read_table(path, filesystem=fs, columns=["id", "path"])
    except (OSError, KeyError, ValueError) as err:
        raise SourceError(f"cannot read manifest {manifest!r} (needs columns id, path): {err}") from None
    return _from_pairs(zip(table.column("id").to_pylist(), table.column("path").to_pylist()), root, manifest)


def list_inputs(source: str, kind: str = "auto", image_root: str | None = None,
                limit: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Every input of a run, sorted by id; `limit` keeps a seeded, stable random subset."""
    kind = detect_kind(source) if kind == "auto" else kind
    if kind == "folder":
        items = list_folder(source)
    elif kind in ("coco", "visualgenome"):
        if not image_root:
            raise SourceError(f"data.image_root must be set: {kind} annotations name files, not their folder")
        items = (list_coco if kind == "coco" else list_visualgenome)(source, image_root)
    elif kind == "manifest":
        items = list_manifest(source, image_root or posixpath.dirname(_join(source, ".")))
    else:
        raise SourceError(f"data.kind={kind!r} is not one of {list(SOURCE_KINDS)}")
    if limit is not None and limit < len(items):
        # A hash order, not the first N: a stable sample that is not biased by naming.
        items = sorted(items, key=lambda it: sample_seed(seed, it["id"], "subset"))[:limit]
    return sorted(items, key=lambda it: it["id"])


def items_to_batch(items: list[dict]) -> dict[str, np.ndarray]:
    return {key: np.array([it[key] for it in items], dtype=object) for key in ("id", "source", "error", "raw_path")}


def _open(source: str, raw_path: bytes):
    """A readable file: through its raw bytes (a local name that is not UTF-8), else pyarrow."""
    if raw_path:
        return open(raw_path, "rb")
    fs, path = filesystem(source)
    return fs.open_input_stream(path)


def read_files(batch: dict[str, np.ndarray], max_mb: float | None = None) -> dict[str, np.ndarray]:
    """Stage: `source` -> `bytes`; a file that cannot be read, or is over `max_mb`, is an error row.

    At most `max_mb` MB and one byte are read: a huge file never fills a worker's memory.
    """
    errors = np.array(batch["error"], dtype=object)
    data = np.full(len(errors), b"", dtype=object)
    raw_paths = batch.get("raw_path", [b""] * len(errors))
    limit = int(max_mb * 2**20) if max_mb is not None else -1
    for i, (source, raw) in enumerate(zip(batch["source"], raw_paths)):
        if errors[i]:
            continue
        try:
            with _open(source, raw) as f:
                data[i] = f.read(limit + 1) if limit >= 0 else f.read()
        except (OSError, ValueError) as err:  # missing, unreadable, or a path the filesystem refuses
            errors[i] = f"read failed: {err}"
            continue
        if 0 <= limit < len(data[i]):
            data[i] = b""
            errors[i] = f"too large: more than data.max_file_mb={max_mb:g} MB"
    return {**batch, "bytes": data, "error": errors}
