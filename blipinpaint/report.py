"""Logs and plots: `metrics.jsonl` records and the PNG figures a person looks at."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")  # files only; no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from blipinpaint.sources import filesystem  # noqa: E402


def read_jsonl(uri: str) -> list[dict]:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type.name != "File":
        return []
    with fs.open_input_stream(path) as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


def write_text(uri: str, text: str) -> None:
    """Write a whole file, local or in an object store, creating its folder."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def write_jsonl(uri: str, records: list[dict]) -> None:
    """Rewrite the whole log: works the same on local disks and object stores (no appends)."""
    write_text(uri, "".join(json.dumps(r) + "\n" for r in records))


def _save(fig, uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_curves(records: list[dict], x: str, series: dict[str, str], title: str, uri: str) -> None:
    """One line per `series` key (column -> label) against `x`."""
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for column, label in series.items():
        points = [(r[x], r[column]) for r in records if r.get(column) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, label=label)
            plotted = True
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend()
    _save(fig, uri)


def plot_scatter(pred: np.ndarray, true: np.ndarray, names: tuple[str, ...], uri: str) -> None:
    """Predicted against true, one panel per target, with the y = x line."""
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4))
    for ax, j, name in zip(np.atleast_1d(axes), range(len(names)), names):
        ax.scatter(true[:, j], pred[:, j], s=6, alpha=0.5)
        lo, hi = float(min(true[:, j].min(), pred[:, j].min())), float(max(true[:, j].max(), pred[:, j].max()))
        ax.plot([lo, hi], [lo, hi], color="gray", linewidth=1)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
    fig.suptitle("scorer on the held-out split")
    _save(fig, uri)


def write_tensorboard(records: list[dict], x: str, logdir: str) -> None:
    """The numeric fields of `records` as TensorBoard scalars (tensorboardX, which Ray Train ships)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        raise RuntimeError("train.tensorboard=true needs tensorboardX: pip install tensorboardX") from err
    with SummaryWriter(logdir) as writer:
        for r in records:
            for key, value in r.items():
                if key != x and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, global_step=int(r[x]))
