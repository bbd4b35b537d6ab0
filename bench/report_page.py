"""How heavy `report.html` is and how fast it opens in headless Chromium.

    .venv/bin/python bench/report_page.py [runs/default/eval/report.html] [--cards 200] [--loads 5]

Measures the given page (by default the embedded default's, which the quick start writes)
and a page of `--cards` samples at 512² built from the shipped photographs through the same
card code and template (what the default `evaluate.gallery_limit` gives on a full-size run).
For each: the page's size, the size of its `report_files/`, and over `--loads` loads in a
fresh tab, the median time from navigation to the load event (every thumbnail decoded) and
to the first paint. Chromium and its driver are the system's (`chromium`, `chromium-driver`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from blipinpaint import report_page
from blipinpaint.config import sample_images_dir
from blipinpaint.io import encode_png
from blipinpaint.report_tables import Table


def synthetic_page(folder: Path, cards: int) -> Path:
    """A page of `cards` samples at 512²: the shipped photographs as every image, captions
    of a realistic length."""
    photos = [np.asarray(Image.open(p).convert("RGB").resize((512, 512))) for p in sorted(sample_images_dir().iterdir())
              if p.suffix.lower() in {".jpg", ".jpeg", ".png"}]
    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[128:320, 160:400] = 255
    built, files = [], {}
    for k in range(cards):
        pngs = [encode_png(photos[(k + j) % len(photos)]) for j in range(4)]
        row = {"id": f"sample{k:06d}", "source": f"s3://bucket/coco/{k:012d}.jpg",
               "caption": "a man riding a wave on top of a surfboard", "caption_finetuned": "a man riding a wave",
               "mask_area": 0.2, "image_png": pngs[0], "mask_png": encode_png(mask), "inpainted_png": pngs[1],
               "inpainted_baseline_png": pngs[2], "inpainted_finetuned_png": pngs[3],
               **{m + s: 0.5 for m in ("clip_score", "ssim", "psnr") for s in ("", "_baseline", "_finetuned")}}
        card, images = report_page.card(row, k, "10-30%")
        built.append(card)
        files.update(images)
    report_page.write_files(str(folder), files)
    table = Table(["", "CLIP score ↑", "FID ↓", "n"], [["+ BLIP caption", "29.88 [29.7, 30.0]", "44.15", "10000"]])
    return Path(report_page.write_page(str(folder), {
        "dataset": "synthetic", "run_dir": str(folder), "counts": {"samples": 10000, "errors": 0, "changed": 100},
        "tables": {"table1": table, "paired": table, "metrics": table, "buckets": table, "caption_effect": table},
        "caption_effect_text": "", "intervals_text": "", "scorer_text": "", "reranked_text": "", "plots": [],
        "gallery": {"cards": built, "shown": cards, "total": 10000, "limit": cards,
                    "sort_keys": report_page.sort_keys(["baseline", "blip", "finetuned"]), "buckets": ["10-30%"]},
        "errors": {"rows": [], "total": 0}, "settings": [], "config_yaml": ""}))


def measure(driver, page: Path, loads: int) -> dict:
    times, paints = [], []
    for _ in range(loads):
        driver.switch_to.new_window("tab")
        driver.get(f"file://{page}")
        timing = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "const p = performance.getEntriesByName('first-contentful-paint')[0];"
            "return [n.loadEventEnd, p ? p.startTime : null, document.images.length];")
        times.append(timing[0])
        paints.append(timing[1])
        images = timing[2]
        driver.close()
        driver.switch_to.window(driver.window_handles[0])
    files = page.parent / report_page.FILES
    return {"page": str(page), "page_mb": round(page.stat().st_size / 1e6, 3),
            "report_files_mb": round(sum(f.stat().st_size for f in files.iterdir()) / 1e6, 1) if files.exists() else 0,
            "images": images, "load_event_ms": round(statistics.median(times)),
            "first_paint_ms": round(statistics.median(p for p in paints if p is not None))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("page", nargs="?", default="runs/default/eval/report.html")
    parser.add_argument("--cards", type=int, default=200)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--out", default="bench/results/report_page.json")
    args = parser.parse_args()

    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    work = Path(tempfile.mkdtemp(prefix="bench-page-"))
    try:
        pages = [Path(args.page).absolute()] if Path(args.page).exists() else []
        if args.cards:
            pages.append(synthetic_page(work, args.cards))
        results = {"command": f"bench/report_page.py {args.page} --cards {args.cards} --loads {args.loads}",
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                              f"{driver.capabilities['browserVersion']} headless",
                   "pages": [measure(driver, p, args.loads) for p in pages]}
    finally:
        driver.quit()
        shutil.rmtree(work, ignore_errors=True)
    for row in results["pages"]:
        print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
