"""The PNG figures a person looks at: training curves, scatter plots, bar charts, image grids."""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from blipinpaint.storage import filesystem  # noqa: E402


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


def plot_scatter(pred: np.ndarray, true: np.ndarray, names: tuple[str, ...], uri: str,
                 title: str = "scorer on the held-out split") -> None:
    """Predicted against true, one panel per target, with the y = x line."""
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4))
    for ax, j, name in zip(np.atleast_1d(axes), range(len(names)), names):
        ax.scatter(true[:, j], pred[:, j], s=6, alpha=0.5)
        lo, hi = float(min(true[:, j].min(), pred[:, j].min())), float(max(true[:, j].max(), pred[:, j].max()))
        ax.plot([lo, hi], [lo, hi], color="gray", linewidth=1)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
    fig.suptitle(title)
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


def plot_grouped_bars(panels: dict[str, dict[str, dict[str, tuple]]], title: str, uri: str) -> None:
    """Bar charts, one panel each: {panel: {group: {series: (value, error)}}}.

    Bars of one group stand side by side, one colour per series; a missing value (None)
    leaves its slot empty rather than drawing a zero. The error bar is a spread either
    side, an interval (low, high) around the value, or None.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (panel, groups) in zip(axes[0], panels.items()):
        series = list(dict.fromkeys(s for g in groups.values() for s in g))
        width = 0.8 / max(len(series), 1)
        for j, name in enumerate(series):
            xs, ys, errs = [], [], []
            for i, values in enumerate(groups.values()):
                value, error = values.get(name, (None, None))
                if value is not None:
                    xs.append(i + (j - (len(series) - 1) / 2) * width)
                    ys.append(value)
                    low, high = error if isinstance(error, tuple) else (value - (error or 0.0), value + (error or 0.0))
                    errs.append((value - low, high - value))
            has_errors = any(e for pair in errs for e in pair)
            ax.bar(xs, ys, width, yerr=np.array(errs).T if has_errors else None, capsize=3, label=name)
        ax.set_xticks(range(len(groups)), list(groups))
        ax.set_title(panel)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, uri)


def plot_image_grid(rows: list[dict], titles: list[str], uri: str) -> None:
    """A row per sample: its `images` side by side under `titles`, each with its caption."""
    cols = len(titles)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, (image, caption) in enumerate(zip(row["images"], row["captions"])):
            ax = axes[r][c]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if caption:
                ax.set_xlabel(textwrap.fill(caption, 30), fontsize=7)
        axes[r][0].set_ylabel(textwrap.shorten(row["id"], 24), fontsize=7)
    _save(fig, uri)
