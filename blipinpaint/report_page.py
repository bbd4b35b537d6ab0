"""`report.html`: an evaluation as one page a person opens from a download, no server needed.

The page holds Table 1 and the other tables of `report.md`, the plots beside it, a gallery
of held-out samples (ground truth, masked input and the three inpaintings side by side, each
caption under its image, each sample's metrics) that sorts and filters in the page, and the
errors table. Thumbnails are inline (WebP data URIs), so the page alone shows everything;
the full-size images sit beside it in `report_files/`, a click away. Nothing is fetched from
anywhere else, and every value is escaped (captions come from models, ids and errors from
users' data). `write_report_page` gathers the evaluate job's page from its report and rows.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
from concurrent.futures import ThreadPoolExecutor

import jinja2
import numpy as np
from PIL import Image
from pyarrow.fs import FileSelector, FileType

from blipinpaint.config import Config, to_yaml
from blipinpaint.evaluation import (
    DELTA_LABELS,
    PAIRED,
    VARIANTS,
    Variant,
    bucket_names,
    bucket_of,
    deltas_in,
    variants_in,
)
from blipinpaint.io import decode_png, encode_png
from blipinpaint.layout import Folder, RunLayout
from blipinpaint.masks import masked_pixels
from blipinpaint.reader import read_errors, read_rows, row_reads
from blipinpaint.report_markdown import caption_effect_parts, intervals_text, reranked_text, scorer_text
from blipinpaint.report_tables import Table, fmt
from blipinpaint.seeds import sample_seed
from blipinpaint.storage import filesystem, is_file, write_text

FILES = "report_files"
THUMB = 128  # px, the longer side: a 512² sample's five thumbnails take about 25 kB of the page
METRIC_NAMES = {"clip_score": "CLIP score", "ssim": "SSIM", "psnr": "PSNR (dB)"}
# The page's plots, beside it: {file: title}.
PLOTS = {"metrics.png": "SSIM, PSNR and CLIP score per variant", "mask_buckets.png": "by mask area",
         "deltas.png": "paired differences per sample, by mask area", "grid.png": "examples (paper, Figure 4)",
         "scorer_changed.png": "the scorer's prediction for the changed captions against their scores"}
ERRORS_LISTED = 1000  # error rows on the page at most (the count says how many there are)
# The images of a card, left to right: (key, title, PNG column or None for the masked input);
# a variant's only where the row has it.
IMAGES = [("truth", "ground truth", "image_png"), ("masked", "masked input", None),
          *((key, v.short, v.image) for key, v in VARIANTS.items())]


def sort_keys(variants) -> dict[str, str]:
    """What the gallery sorts by: mask area, and each paired difference between `variants`."""
    return {"mask_area": "mask area", **{f"{d}:{m}": f"{DELTA_LABELS[d]}: {METRIC_NAMES[m]}"
                                         for d in deltas_in(variants) for m in PAIRED}}

_env = jinja2.Environment(loader=jinja2.PackageLoader("blipinpaint", "templates"), autoescape=True,
                          undefined=jinja2.StrictUndefined)


def thumbnail(image: np.ndarray) -> str:
    """A data URI of the image at most THUMB px on its longer side (never enlarged)."""
    picture = Image.fromarray(image)
    picture.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    picture.save(buf, format="WEBP", quality=80)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def card(row: dict, index: int, bucket: str) -> tuple[dict, dict[str, bytes]]:
    """One gallery sample from its evaluated row: what the page shows, and its full-size
    images as {file name under `report_files/`: PNG bytes}."""
    image, mask = decode_png(row["image_png"]), decode_png(row["mask_png"]) > 127
    masked = masked_pixels(image[None], mask[None])[0]
    variants = variants_in(row)
    captions = {key: row[v.caption] for key, v in variants.items() if v.caption is not None}
    images, files = [], {}
    for key, title, column in IMAGES:
        if column is not None and column not in row:
            continue
        png = encode_png(masked) if column is None else row[column]
        name = f"{index:05d}-{key}.png"
        files[name] = png
        images.append({"title": title, "thumb": thumbnail(masked if column is None else decode_png(png)),
                       "href": f"{FILES}/{name}", "caption": captions.get(key, "")})
    value = {(key, m): _finite(row[m + v.suffix]) for key, v in variants.items() for m in PAIRED}
    sort = {"mask_area": _finite(row["mask_area"])}
    for delta, (a, b) in deltas_in(variants).items():
        for m in PAIRED:
            x, y = value[(a, m)], value[(b, m)]
            sort[f"{delta}:{m}"] = None if x is None or y is None else x - y
    metrics = [[v.label, *(fmt(row[m + v.suffix], 3) for m in PAIRED)] for key, v in variants.items()]
    metrics += [[DELTA_LABELS[d], *(fmt(sort[f"{d}:{m}"], 3) for m in PAIRED)] for d in deltas_in(variants)]
    changed = row["caption"] != row["caption_finetuned"]
    return {"id": str(row["id"]), "source": str(row["source"]), "bucket": bucket,
            "mask_area": f"{100 * float(row['mask_area']):.1f} %", "changed": bool(changed),
            "search": "\n".join(map(str, captions.values())).lower(), "sort": sort,
            # For the page's script (JSON.parse): a NaN or an infinity would stop it, so none gets in.
            "sort_json": json.dumps(sort, allow_nan=False),
            "images": images, "metrics": metrics}, files


def write_files(out_dir: str, files: dict[str, bytes]) -> None:
    """The full-size images into `out_dir/report_files/`, in parallel (a bucket's PUTs); an
    earlier page's image of the same name is replaced."""
    fs, root = filesystem(Folder(out_dir) / FILES)
    fs.create_dir(root, recursive=True)

    def put(item):
        with fs.open_output_stream(f"{root}/{item[0]}") as f:
            f.write(item[1])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, files.items()))


def prune_files(out_dir: str, keep: set[str]) -> None:
    """Deletes the images of `report_files/` that the page does not link (an earlier page's:
    a rerun may show other or fewer samples); after the new page is written, so that the
    old page stays whole until then."""
    fs, root = filesystem(Folder(out_dir) / FILES)
    for info in fs.get_file_info(FileSelector(root, allow_not_found=True)):
        if info.type == FileType.File and info.base_name not in keep:
            fs.delete_file(info.path)


def render(context: dict) -> str:
    """The page: `templates/report.html` with `context` (see `write_report_page`), every
    value escaped. The page's inline style and script carry a fresh nonce, and its content
    security policy runs nothing else: an escape that failed still could not run a script."""
    return _env.get_template("report.html").render(**context, nonce=secrets.token_urlsafe(16),
                                                   metric_names=[METRIC_NAMES[m] for m in PAIRED])


def write_page(out_dir: str, context: dict) -> str:
    uri = Folder(out_dir) / "report.html"
    write_text(uri, render(context))
    return uri


def gallery_columns(variants: dict[str, Variant]) -> list[str]:
    """What a gallery card shows of an evaluated row."""
    return ["source", "mask_area", "image_png", "mask_png", *(v.caption for v in variants.values() if v.caption),
            *(v.image for v in variants.values()), *(m + v.suffix for v in variants.values() for m in PAIRED)]


def write_gallery(out_dir: str, ids: list[str], variants: dict[str, Variant],
                  edges: list[float]) -> tuple[list[dict], set[str]]:
    """The cards of the evaluated rows `ids` of `out_dir`, their full-size images written
    beside the page; returns the cards and the names of the images. Reads a part at a time,
    so that only that part's chosen rows are in memory."""
    cards, written = [], set()
    columns = gallery_columns(variants)
    for part in row_reads(out_dir, ids):
        rows = read_rows({"path": [part["path"]], "ids": [part["ids"]]}, ["id", *columns])
        files = {}
        for k, bucket in enumerate(bucket_of(rows["mask_area"], edges)):
            entry, images = card({c: v[k] for c, v in rows.items()}, len(cards), bucket)
            cards.append(entry)
            files.update(images)
        write_files(out_dir, files)
        written.update(files)
    return cards, written


def settings(cfg: Config, report: dict) -> list[tuple[str, str]]:
    """What the evaluation ran with, for the page's settings table."""
    evaluation_set, intervals = report["evaluation_set"], report["intervals"]
    return [("dataset", report["dataset"]), ("run_dir", cfg.run_dir), ("models preset", cfg.models.preset),
            *((f"model: {k}", v) for k, v in report["models"].items()), ("FID protocol", report["fid_protocol"]),
            ("held-out share", fmt(evaluation_set["heldout_fraction"], 3)),
            ("evaluate.limit", str(evaluation_set["limit"])),
            ("mask-area bucket edges", ", ".join(map(str, report["mask_bucket_edges"]))),
            ("bootstrap", f"{intervals['replicates']} draws ({intervals['fid_replicates']} for FID), "
                          f"{round(100 * intervals['confidence'])} % intervals, seed {intervals['seed']}"),
            ("seed", str(cfg.seed)), ("evaluate's wall time", f"{report['wall_s']} s")]


def write_report_page(cfg: Config, run_layout: RunLayout, report: dict, tables: dict[str, Table], ids: list[str],
                      selected: list[str]) -> str:
    """`report.html` of the evaluation `report`: its tables (`report.md`'s), the plots, a
    gallery of up to `evaluate.gallery_limit` of the evaluated samples `ids` (chosen by a
    hash, as `evaluate.limit`), the errors of generate and those of evaluate among the
    `selected` held-out ids."""
    out_dir, edges, evaluation_set = run_layout.eval, report["mask_bucket_edges"], report["evaluation_set"]
    chosen = sorted(ids, key=lambda i: sample_seed(cfg.seed, i, "gallery"))[: cfg.evaluate.gallery_limit]
    cards, written = write_gallery(out_dir, chosen, variants_in(report["variants"]), edges)
    generate_errors, generate_count = read_errors(run_layout.generate, limit=ERRORS_LISTED)
    evaluate_errors, _ = read_errors(out_dir, set(selected), limit=ERRORS_LISTED)
    errors = [{"job": "evaluate", **e} for e in evaluate_errors] + [{"job": "generate", **e} for e in generate_errors]
    effect_words, effect_table = caption_effect_parts(report)
    page = write_page(out_dir, {
        "dataset": report["dataset"], "run_dir": cfg.run_dir,
        "counts": {"samples": evaluation_set["samples"], "errors": evaluation_set["errors"],
                   "generate_errors": generate_count, "changed": report["changed"]["captions"]},
        "tables": {**tables, "caption_effect": effect_table},
        "caption_effect_text": effect_words.replace("`", ""),
        "intervals_text": intervals_text(report["intervals"]).replace("`", ""),
        "scorer_text": scorer_text(report["changed"]),
        "reranked_text": reranked_text(report).strip(),
        "plots": [{"file": f, "title": t} for f, t in PLOTS.items() if is_file(out_dir / f)
                  and (f != "scorer_changed.png" or report["changed"]["scorer"].get("samples"))],
        "gallery": {"cards": sorted(cards, key=lambda c: c["id"]), "shown": len(cards), "total": len(ids),
                    "limit": cfg.evaluate.gallery_limit, "sort_keys": sort_keys(report["variants"]),
                    "buckets": [b for b in bucket_names(edges) if b in report["mask_buckets"]]},
        "errors": {"rows": errors[:ERRORS_LISTED], "total": evaluation_set["errors"] + generate_count},
        "settings": settings(cfg, report), "config_yaml": to_yaml(cfg)})
    prune_files(out_dir, written)
    return page

