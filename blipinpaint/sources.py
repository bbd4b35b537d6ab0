"""Input listings: which inputs a run uses, each with a stable id derived from the source.

`list_inputs` takes `data.source` and its kind (`data.kind`, detected when `auto`): a folder
of images, COCO annotations, VisualGenome's image_data.json, a Parquet manifest of paths,
WebDataset tar shards, or Parquet files of encoded images. Each input is an item that says
where its bytes are (a file, a byte range of a shard, a Parquet row), which
`source_reads.read_files` reads later, batch by batch. An input that cannot be used is an
error row, so every input is accounted for exactly once; `SourceError` is for a source
that cannot be listed at all. Local paths and URIs (`s3://...`) both go through pyarrow's
filesystems.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand
from pyarrow import fs as pafs

from blipinpaint.seeds import sample_seed
from blipinpaint.storage import filesystem, is_remote
from blipinpaint.tar_headers import plain_members

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
SOURCE_KINDS = ("auto", "folder", "coco", "visualgenome", "manifest", "webdataset", "parquet_images")
CARRIED = ("txt", "json")  # WebDataset members carried along with their sample
CARRIED_MAX_BYTES = 1 << 20
LIST_THREADS = 16  # shards listed at once: reads from a bucket wait on the network


class SourceError(ValueError):
    """The source as a whole cannot be listed (missing, unreadable, wrong format)."""


def _join(base: str, path: str) -> str:
    """`base` + `path` as a URI or local path, keeping the scheme of `base`."""
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    return posixpath.normpath(posixpath.join(posixpath.abspath(base), path))


def contained(root: str, path: str) -> str | None:
    """`path` resolved against `root`, or None when it points outside `root`.

    Paths from an annotations file or manifest must stay inside the image root: one that
    escapes it (`..`, an absolute path or URI elsewhere) becomes an error row, never a read.
    The check is on the path's text: links inside the root are followed, since whoever can
    place a link there already controls the files."""
    root = _join(root, ".")
    full = path if ("://" in path or path.startswith("/")) else _join(root, path)
    full = _join(full, ".")  # normalise `..` in absolute paths too
    return full if full == root or full.startswith(root.rstrip("/") + "/") else None


def detect_kind(source: str) -> str:
    if "{" in source:
        return "parquet_images" if source.endswith(".parquet") else "webdataset"
    fs, path = filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"data.source {source!r} does not exist")
    if info.type == pafs.FileType.Directory:
        # os.listdir on a disk: pyarrow cannot list a name that is not UTF-8 at all.
        names = os.listdir(path) if not is_remote(source) else [i.base_name for i in
                                                                 fs.get_file_info(pafs.FileSelector(path))]
        top = {PurePosixPath(name).suffix.lower() for name in names}
        if not top & IMAGE_EXTENSIONS and top & {".tar", ".parquet"}:
            return "webdataset" if ".tar" in top else "parquet_images"
        return "folder"
    if path.endswith(".tar"):
        return "webdataset"
    if path.endswith(".parquet"):
        try:
            names = pq.read_schema(path, filesystem=fs).names
        except (OSError, ValueError) as err:
            raise SourceError(f"cannot read {source!r} as Parquet: {err}") from None
        return "manifest" if {"id", "path"} <= set(names) else "parquet_images"
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


def _item(sample_id: str, source: str = "", error: str = "", raw_path: bytes = b"", file: str = "",
          offset: int = -1, size: int = -1, row: int = -1, annotations: str = "") -> dict:
    """One input. `source` names it for people; the bytes are the file `source` (or `raw_path`),
    or, for a member of a shard (`file`), `size` bytes at `offset`, or the image cell of
    `row` of a Parquet `file`."""
    return {"id": sample_id, "source": source, "error": error, "raw_path": raw_path, "file": file,
            "offset": offset, "size": size, "row": row, "annotations": annotations}


ITEM_FIELDS = tuple(_item(""))
ITEM_SCHEMA = pa.schema([(k, pa.binary() if k == "raw_path" else pa.int64() if isinstance(v, int) else pa.string())
                         for k, v in _item("").items()])  # an item as a column each, typed (no page is untyped)


def _text(name: str) -> str:
    """A local file name as UTF-8 text: bytes that are not UTF-8 spelled out as `\\xNN`
    (`caf\\xe9.png`), since ids and Parquet strings are UTF-8 text; the file is then read
    through its raw bytes (the item's `raw_path`)."""
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
    """`folder`: every image file below `root`; the id is the path relative to it."""
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
    """`coco`: an MSCOCO annotations JSON (its `images` list); the id is `file_name`."""
    data = _read_json(annotations)
    try:
        pairs = [(img["file_name"], img["file_name"]) for img in data["images"]]
    except (KeyError, TypeError) as err:
        raise SourceError(f"{annotations!r} is not COCO annotations: missing {err}") from None
    return _from_pairs(pairs, root, annotations)


def list_visualgenome(image_data: str, root: str) -> list[dict[str, str]]:
    """`visualgenome`: VisualGenome's `image_data.json`; the id is `image_id`, the file is
    `<image root>/<last two parts of its url>` (`VG_100K/1.jpg`), as the download unpacks."""
    data = _read_json(image_data)
    try:
        pairs = [(img["image_id"], "/".join(str(img["url"]).rstrip("/").split("/")[-2:])) for img in data]
    except (KeyError, TypeError) as err:
        raise SourceError(f"{image_data!r} is not VisualGenome image data: missing {err}") from None
    return _from_pairs(pairs, root, image_data)


def list_manifest(manifest: str, root: str) -> list[dict[str, str]]:
    """`manifest`: a Parquet file with `id` and `path` columns."""
    fs, path = filesystem(manifest)
    try:
        table = pq.read_table(path, filesystem=fs, columns=["id", "path"])
    except (OSError, KeyError, ValueError) as err:
        raise SourceError(f"cannot read manifest {manifest!r} (needs columns id, path): {err}") from None
    return _from_pairs(zip(table.column("id").to_pylist(), table.column("path").to_pylist()), root, manifest)


def expand(source: str, suffix: str) -> tuple[str, list[str]]:
    """(root, files) of a sharded source: a brace pattern, one file, or a folder's `suffix`
    files (below it, sorted). The root is the folder the ids are relative to."""
    if "{" in source:
        files = list(braceexpand(source))
        root = posixpath.dirname(source.split("{", 1)[0])
    else:
        fs, path = filesystem(source)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"data.source {source!r} does not exist")
        if info.type == pafs.FileType.File:
            return posixpath.dirname(source), [source]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = [_join(source, posixpath.relpath(i.path, path)) for i in infos
                 if i.type == pafs.FileType.File and i.path.endswith(suffix)]
        root = source
    if not files:
        raise SourceError(f"data.source {source!r} holds no {suffix} files")
    return root, sorted(files)


def _relative(root: str, file: str) -> str:
    return posixpath.relpath(_join(file, "."), _join(root, ".")) if root else file


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: (key, extension), at the first dot of the base name."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower() if dot else ""


def _members(shard: str):
    """(name, data offset, size, text or None) of each regular member of a tar shard, the text
    of the carried ones (`CARRIED`, up to `CARRIED_MAX_BYTES`): read without tarfile when the
    archive is plain (`tar_headers`, most of a listing's time saved), else with it (which says
    what is wrong: a shard that cannot be read to its end raises)."""
    fs, path = filesystem(shard)
    size = fs.get_file_info(path).size
    wanted = lambda name, n: _member_key(name)[1] in CARRIED and n <= CARRIED_MAX_BYTES  # noqa: E731
    with fs.open_input_stream(path) as f:
        members = plain_members(f, size, wanted)
    if members is not None:
        yield from ((name, at, n, None if data is None else data.decode("utf-8", "replace"))
                    for name, at, n, data in members)
        return
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = _text(member.name)  # a name that is not UTF-8 spelled out, as for files
            text = (tar.extractfile(member).read().decode("utf-8", "replace")
                    if wanted(name, member.size) else None)
            yield name, member.offset_data, member.size, text
        # tarfile takes a header cut short for the end of the archive: a whole tar ends
        # with two zero blocks after its last member.
        if size is not None and size < tar.offset + 2 * tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"it ends at byte {size} without the end-of-archive blocks (truncated?)")


def scan_shard(shard: str, shard_id: str) -> list[dict]:
    """The samples of one tar shard, read once from start to end (the headers; carried
    members' contents): one item per key. A key without an image member, or a shard that
    cannot be read to its end, is an error row naming the shard and key."""
    samples: dict[str, dict] = {}
    error = ""
    try:
        for name, offset, size, text in _members(shard):
            key, ext = _member_key(name)
            sample = samples.setdefault(key, {"members": [], "image": None, "carried": {}})
            sample["members"].append(ext)
            if sample["image"] is None and f".{ext}" in IMAGE_EXTENSIONS:
                sample["image"] = (name, offset, size)
            elif text is not None:
                sample["carried"][ext] = text
    except (tarfile.TarError, OSError, EOFError) as err:
        last = next(reversed(samples), None)
        error = f"corrupt tar: {shard} cannot be read past {f'key {last!r}' if last else 'its start'}: {err}"
    items = []
    for key, sample in samples.items():
        sample_id = f"{shard_id}/{key}"
        if sample["image"] is None:
            items.append(_item(sample_id, f"{shard}#{key}", f"no image: {shard} key {key!r} has members "
                                                           f"{sorted(sample['members'])}, none an image"))
            continue
        name, offset, size = sample["image"]
        carried = json.dumps(sample["carried"], sort_keys=True) if sample["carried"] else ""
        items.append(_item(sample_id, f"{shard}#{name}", file=shard, offset=offset, size=size, annotations=carried))
    if error:
        items.append(_item(shard_id, shard, error))
    return items


def list_webdataset(source: str) -> list[dict]:
    """`webdataset`: tar shards (one `.tar`, a brace pattern `shards/{00000..00099}.tar`, or a
    folder of `.tar` files), as img2dataset writes them. The members of one sample share a key
    (`_member_key`); the id is `<shard>/<key>`, the image is the key's first image member, its
    `.txt` and `.json` members are carried along (`annotations`). Each shard is read once (the
    headers, shards in parallel); the image is then read by its byte range."""
    root, shards = expand(source, ".tar")
    with ThreadPoolExecutor(LIST_THREADS) as pool:
        found = pool.map(lambda shard: scan_shard(shard, _relative(root, shard)), shards)
        return _unique([it for items in found for it in items], source)


def list_parquet_images(source: str, image_column: str = "image", id_column: str | None = None) -> list[dict]:
    """`parquet_images`: Parquet files (one, a brace pattern, or a folder of `.parquet`) whose
    `image_column` holds the encoded image: bytes, or Hugging Face's `{bytes, path}` struct.
    The id is `id_column`'s value, or `<file>/<row>`. Listing reads footers (and the id
    column); a batch reads each row group it needs once."""
    root, files = expand(source, ".parquet")

    def scan(file: str) -> list[dict]:
        fs, path = filesystem(file)
        try:
            meta = pq.ParquetFile(path, filesystem=fs)
            names = meta.schema_arrow.names
            missing = [c for c in (image_column, id_column) if c is not None and c not in names]
            if missing:
                raise SourceError(f"{file} has no column {missing[0]!r} (columns: {names}); "
                                  "data.image_column and data.id_column name them")
            ids = meta.read(columns=[id_column]).column(0).to_pylist() if id_column else None
        except (OSError, ValueError, pa.ArrowException) as err:
            raise SourceError(f"cannot read {file} as Parquet: {err}") from None
        name = _relative(root, file)
        out = []
        for row in range(meta.metadata.num_rows):
            where = f"{file}#row={row}"
            if ids is not None and ids[row] is None:
                out.append(_item(f"{name}/{row}", where, f"no id: {file} row {row} has a null {id_column!r}"))
            else:
                out.append(_item(str(ids[row]) if ids is not None else f"{name}/{row}", where, file=file, row=row))
        return out

    with ThreadPoolExecutor(LIST_THREADS) as pool:
        return _unique([it for items in pool.map(scan, files) for it in items], source)


def list_inputs(source: str, kind: str = "auto", image_root: str | None = None,
                limit: int | None = None, seed: int = 0, image_column: str = "image",
                id_column: str | None = None) -> list[dict[str, str]]:
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
    elif kind == "webdataset":
        items = list_webdataset(source)
    elif kind == "parquet_images":
        items = list_parquet_images(source, image_column, id_column)
    else:
        raise SourceError(f"data.kind={kind!r} is not one of {list(SOURCE_KINDS)}")
    if limit is not None and limit < len(items):
        # A hash order, not the first N: a stable sample that is not biased by naming.
        items = sorted(items, key=lambda it: sample_seed(seed, it["id"], "subset"))[:limit]
    return sorted(items, key=lambda it: it["id"])


def items_to_batch(items: list[dict]) -> dict[str, np.ndarray]:
    """Listed items as one batch of columns (`ITEM_FIELDS`), the form the stages take."""
    return {key: np.array([it[key] for it in items], dtype=object) for key in ITEM_FIELDS}
