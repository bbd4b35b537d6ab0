"""The embedded default's report.html, opened from its folder in headless Chromium."""

import json

import pyarrow.parquet as pq
from helpers import open_page
from selenium.webdriver.common.by import By

from blipinpaint.io import decode_png


def test_the_embedded_defaults_page_opens_whole_from_its_folder_alone(main_run, browser):
    code, folder, output = main_run
    assert code == 0, output[-3000:]
    out = folder / "run" / "eval"
    page = out / "report.html"
    assert output.strip().splitlines()[-1] == f"report: {page} (tables also in report.md)"
    assert page.stat().st_size < 2_000_000
    report = json.loads((out / "report.json").read_text())

    seen = open_page(browser, page)
    assert seen["console_errors"] == [] and seen["broken_images"] == []
    # Nothing from outside its folder: the page, its plots beside it, inline thumbnails.
    assert all(u.startswith(f"file://{out}/") or u.startswith("data:image/") for u in seen["urls"]), seen["urls"]
    plots = {"metrics.png", "mask_buckets.png", "deltas.png", "grid.png"}
    if report["changed"]["scorer"]["samples"]:  # fine-tuning changed a held-out caption
        plots.add("scorer_changed.png")
    assert {u.rsplit("/", 1)[1] for u in seen["urls"] if u.startswith("file:")} == {"report.html", *plots}

    # Table 1, and where the caption helps, as in report.md, cell for cell.
    markdown = (out / "report.md").read_text()
    for heading, selector in (("Table 1", "#table1 + table"),
                              ("Where the caption helps, by mask area", "#caption-effect + p + table")):
        section = markdown.split(f"## {heading}")[1].split("\n## ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # the header row left out
        table = browser.find_element(By.CSS_SELECTOR, selector)
        assert [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")] == [
            [c.strip() for c in line.strip().strip("|").split(" | ")] for line in rows]

    # A card per held-out sample (the embedded default has 2, under the gallery's limit), each
    # image a click away at full size.
    cards = browser.find_elements(By.CSS_SELECTOR, "#gallery .card")
    evaluated = pq.read_table(out / "samples", columns=["id"]).column("id").to_pylist()
    assert [c.get_attribute("data-id") for c in cards] == sorted(evaluated)
    assert len(cards) == report["evaluation_set"]["samples"] == 2
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#gallery a")]
    assert len(links) == 5 * len(cards)
    for link in links:
        assert decode_png((out / link.split(f"{out}/", 1)[1]).read_bytes()).shape[:2] == (64, 64)
    generated = json.loads((folder / "run" / "generate" / "stats.json").read_text())
    assert len(browser.find_elements(By.CSS_SELECTOR, "#error-table tbody tr")) == (
        report["evaluation_set"]["errors"] + generated["errors"])
