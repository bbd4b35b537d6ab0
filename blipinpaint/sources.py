"""Input listings: which images a run uses, each with a stable id derived from the source."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})


def list_folder(root: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """Image files under `root`, sorted; the id is the path relative to `root`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    items = [{"id": p.relative_to(root).as_posix(), "source": str(p)} for p in files]
    return items[:limit] if limit is not None else items


def read_files(items: list[dict[str, str]]) -> dict[str, np.ndarray]:
    """A batch of `id`, `source`, `bytes`, `error` (a file that cannot be read is an error row)."""
    data, errors = [], []
    for item in items:
        try:
            data.append(Path(item["source"]).read_bytes())
            errors.append("")
        except OSError as err:
            data.append(b"")
            errors.append(f"read failed: {err.strerror or err}")
    return {
        "id": np.array([i["id"] for i in items], dtype=object),
        "source": np.array([i["source"] for i in items], dtype=object),
        "bytes": np.array(data, dtype=object),
        "error": np.array(errors, dtype=object),
    }
