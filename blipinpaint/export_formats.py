"""The two forms an exported sample takes: a Hugging Face `datasets` row and a WebDataset sample.

Both carry the same things: the four images as the PNG bytes generate committed (never
decoded and encoded again), the caption, the scores and the provenance of the row. Hugging
Face's Parquet convention for an image is a `{bytes, path}` struct column, with the
`datasets` features in the schema's `huggingface` metadata (what `Features.arrow_schema`
writes and `Features.from_arrow_schema` reads), so `load_dataset` decodes the column to PIL
images. A WebDataset sample is the tar members `<key>.<name>` sharing one key: a `.png`
per image, `.txt` the caption, `.json` the rest. Files are written byte for byte the same
from the same rows (fixed member times and owners, sorted JSON), so a shard written again
after a kill is the shard written once.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile

import pyarrow as pa

from blipinpaint.records import METRIC_COLUMNS

IMAGES = ("image", "mask", "inpainted", "inpainted_baseline")  # generate's `<name>_png` columns
MODELS = ("captioner_model", "inpainter_model", "clip_model")
ABOUT = ("mask_kind", "mask_area", "noise_seed", "width", "height")
# What an export reads of generate's rows (`records.SAMPLE_SCHEMA`): all but the caption
# features, which are the scorer's training input and only mean something to that captioner.
READ_COLUMNS = ["id", "source", "caption", *(f"{n}_png" for n in IMAGES), *ABOUT, *METRIC_COLUMNS, *MODELS,
                "annotations"]

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_VALUE = {pa.string(): "string", pa.float32(): "float32", pa.int64(): "int64", pa.int32(): "int32"}
HF_FIELDS = ([("key", pa.string()), ("id", pa.string()), ("source", pa.string()), ("caption", pa.string())]
             + [(n, _IMAGE) for n in IMAGES]
             + [("mask_kind", pa.string()), ("mask_area", pa.float32()), ("noise_seed", pa.int64()),
                ("width", pa.int32()), ("height", pa.int32())]
             + [(m, pa.float32()) for m in METRIC_COLUMNS]
             + [(m, pa.string()) for m in MODELS]
             + [("annotations", pa.string()), ("licence", pa.string()), ("generate_fingerprint", pa.string())])


def hf_schema(provenance: dict) -> pa.Schema:
    """The Parquet schema of the exported rows: the `datasets` features under `huggingface`
    (images as `Image`), and `provenance` (what made the file) under `blipinpaint`."""
    features = {name: {"_type": "Image"} if type_ == _IMAGE else {"dtype": _VALUE[type_], "_type": "Value"}
                for name, type_ in HF_FIELDS}
    return pa.schema(HF_FIELDS, metadata={"huggingface": json.dumps({"info": {"features": features}}),
                                          "blipinpaint": json.dumps(provenance, sort_keys=True)})


def sample_key(sample_id: str) -> str:
    """A WebDataset key for a sample id: readable, unique, and safe as a tar member's stem.

    WebDataset splits a member name at the first dot of its base name, and ids hold dots and
    slashes (`astronaut.jpg`, `shards/00001/000042`): the id's letters, digits, `-` and `_`
    (others become `_`, at most 48), then a digest of the whole id that keeps keys unique.
    """
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", sample_id)[:48]
    return f"{readable}-{hashlib.blake2b(sample_id.encode(), digest_size=8).hexdigest()}"


def licence_of(annotations: str | None) -> str:
    """The licence a source carried with an image (a WebDataset `.json` member's `license`,
    `LICENSE` or `licence` field, as img2dataset and LAION write them), or ""."""
    try:
        carried = json.loads(annotations) if annotations else {}
        inner = json.loads(carried.get("json", "null")) if isinstance(carried, dict) else None
    except ValueError:
        return ""
    if isinstance(inner, dict):
        for key, value in inner.items():
            if re.fullmatch(r"licen[cs]e", key, re.IGNORECASE) and value not in (None, ""):
                return str(value)[:200]
    return ""


def hf_table(rows: pa.Table, keys: list[str], licences: list[str], generate_fingerprint: str,
             schema: pa.Schema) -> pa.Table:
    """Generate's `rows` (`READ_COLUMNS`) as exported rows of `schema` (`hf_schema`)."""
    n = rows.num_rows
    columns = {"key": pa.array(keys, pa.string()), "licence": pa.array(licences, pa.string()),
               "generate_fingerprint": pa.array([generate_fingerprint] * n, pa.string())}
    for name in IMAGES:
        png = rows.column(f"{name}_png").combine_chunks()
        columns[name] = pa.StructArray.from_arrays([png, pa.nulls(n, pa.string())], fields=list(_IMAGE))
    for field in schema:
        if field.name not in columns:
            columns[field.name] = rows.column(field.name).cast(field.type)
    return pa.table([columns[f.name] for f in schema], schema=schema)


def _finite(value: float | None) -> float | None:
    """JSON has no infinity nor NaN (a perfectly restored hole's PSNR is infinite): null instead."""
    return value if value is not None and math.isfinite(value) else None


def wds_members(row: dict, key: str, split: str, licence: str, generate_fingerprint: str) -> list[tuple[str, bytes]]:
    """One sample's tar members (name, bytes): the caption, the scores and provenance, the images."""
    about = {
        "id": row["id"], "source": row["source"], "split": split, "caption": row["caption"],
        **{name: row[name] for name in ABOUT},
        "scores": {m: _finite(row[m]) for m in METRIC_COLUMNS},
        "models": {m[: -len("_model")]: row[m] for m in MODELS},
        "annotations": row["annotations"] or "", "licence": licence, "generate_fingerprint": generate_fingerprint,
    }
    return ([(f"{key}.txt", row["caption"].encode()), (f"{key}.json", json.dumps(about, sort_keys=True).encode())]
            + [(f"{key}.{name}.png", row[f"{name}_png"]) for name in IMAGES])


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A tar member that depends on its name and bytes alone (no time, owner or mode of this machine)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    tar.addfile(info, io.BytesIO(data))


class Hashed:
    """A write-only stream that hands its bytes on to `out`, counting and hashing them: a file's
    size and sha256 known when it is written, without reading it back."""

    closed = False

    def __init__(self, out):
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data) -> int:
        data = bytes(data)
        self.sha.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:  # the owner of `out` closes it
        pass

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def record(self) -> dict:
        return {"sha256": self.sha.hexdigest(), "size": self.size}
