"""The report's numbers as text: formatting and the Markdown tables of `report.md`.

A `Table` is the Markdown string that `report.md` holds and keeps its cells, so that
`report.html` shows the same table. The figures themselves come from `evaluation`.
"""

from __future__ import annotations

from blipinpaint.evaluation import ALL, DELTA_LABELS, DELTAS, PAIRED, deltas_in, variants_in
from blipinpaint.records import METRICS


def fmt(value, digits: int = 2) -> str:
    """Fixed decimals, or significant digits for small values (a tiny model's FID is ~1e-4)."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if value == 0 or abs(value) >= 10 ** -digits * 10 else f"{value:.{digits + 1}g}"


def _mean_std(stats: dict, digits: int = 2) -> str:
    if stats["mean"] is None:
        return "n/a"
    return fmt(stats["mean"], digits) + ("" if stats["std"] is None else f" ± {fmt(stats['std'], digits)}")


def fmt_interval(interval: dict | None, digits: int = 2, sign: bool = False) -> str:
    """`estimate [low, high]`, or n/a."""
    if interval is None or interval["estimate"] is None:
        return "n/a"
    value = ("+" if sign and interval["estimate"] > 0 else "") + fmt(interval["estimate"], digits)
    if interval["low"] is None:
        return value
    return f"{value} [{fmt(interval['low'], digits)}, {fmt(interval['high'], digits)}]"


def _difference(a, b):
    return None if a is None or b is None else a - b


class Table(str):
    """A Markdown table (the string itself) that keeps its cells, so that `report.html`
    shows the same table as `report.md`. The first `left` columns are labels, the others
    numbers (right-aligned)."""

    header: list[str]
    rows: list[list[str]]
    left: int

    def __new__(cls, header: list[str], rows: list[list[str]], left: int = 1):
        def line(cells):
            return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

        rule = "|" + "---|" * left + "---:|" * (len(header) - left)
        table = super().__new__(cls, "\n".join([line(header), rule, *map(line, rows)]))
        table.header, table.rows, table.left = header, rows, left
        return table


def table1(datasets: dict[str, dict]) -> Table:
    """The paper's Table 1: a row per variant, CLIP score ↑ (with its bootstrap interval),
    FID ↓ and samples per dataset; then the paired differences between variants."""
    names = list(datasets)
    header = ["", *(f"{n}: {c}" for n in names for c in ("CLIP score ↑", "FID ↓", "n"))]

    def cell(data: dict, group: str, metric: str) -> str:
        interval = data.get("intervals", {}).get(ALL, {}).get(group, {}).get(metric)
        if interval is not None:
            return fmt_interval(interval, sign=group in DELTAS)
        if group in DELTAS:  # a plain difference where no interval was taken
            a, b = (data["variants"][v] for v in DELTAS[group])
            return fmt(_difference(a["fid"], b["fid"])) if metric == "fid" else "n/a"
        entry = data["variants"][group]
        return fmt(entry["fid"]) if metric == "fid" else _mean_std(entry[metric])

    def cells(data: dict, group: str, variant: str) -> tuple[str, ...]:
        if variant not in data["variants"]:  # e.g. a dataset evaluated without reranked captions
            return "n/a", "n/a", "0"
        return (cell(data, group, "clip_score"), cell(data, group, "fid"), str(data["variants"][variant]["samples"]))

    present = [k for n in names for k in datasets[n]["variants"]]
    rows = [[v.label, *(x for n in names for x in cells(datasets[n], key, key))]
            for key, v in variants_in(present).items()]
    rows += [[f"{DELTA_LABELS[key]} (paired)", *(x for n in names for x in cells(datasets[n], key, a))]
             for key, (a, b) in deltas_in(present).items()]
    return Table(header, rows)


def paired_table(summary: dict) -> Table:
    """The paired per-sample differences with their intervals: overall, on the samples whose
    caption fine-tuning changed, and per mask bucket."""
    intervals = summary["intervals"]
    scopes = {"all samples": (intervals[ALL], summary["variants"]["blip"]["samples"]),
              "caption changed by fine-tuning": (intervals["changed"], summary["changed"]["captions"]),
              **{f"mask area {b}": (intervals["mask_buckets"][b], blk["blip"]["samples"])
                 for b, blk in summary["mask_buckets"].items()}}
    metrics = (*PAIRED, "fid")  # FID's difference where it was bootstrapped: all samples, the changed ones
    rows = [[scope, DELTA_LABELS[key], str(n), *(fmt_interval(groups[key].get(m), 3, sign=True) for m in metrics)]
            for scope, (groups, n) in scopes.items() for key in deltas_in(summary["variants"])]
    return Table(["samples", "difference", "n", *metrics], rows, left=2)


def metrics_table(summary: dict) -> Table:
    """Mean ± std of every metric per variant (the numbers behind the paper's Figures 2-3)."""
    rows = [[v.label, *(_mean_std(summary["variants"][key][m], 3) for m in METRICS)]
            for key, v in variants_in(summary["variants"]).items()]
    return Table(["", *METRICS], rows)


def bucket_table(summary: dict) -> Table:
    variants = variants_in(summary["variants"])
    header = ["mask area", "samples", *(f"{k}: {c}" for k in variants for c in ("CLIP ↑", "FID ↓", "PSNR ↑"))]
    rows = [[bucket, str(block["baseline"]["samples"]),
             *(x for key in variants for x in (_mean_std(block[key]["clip_score"]), fmt(block[key]["fid"]),
                                               fmt(block[key]["psnr"]["mean"])))]
            for bucket, block in summary["mask_buckets"].items()]
    return Table(header, rows)
