"""report.html in a real browser: the gallery sorts and filters, the errors table searches,
and what models and users wrote (captions, ids, error messages) shows as text, never runs.

The page is built from made-up rows through the same `report_page.card` and template as the
evaluate job's; the page of a real run is tested in `rayjobs/test_run_page.py`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import open_page
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from blipinpaint import report_page
from blipinpaint.io import decode_png, encode_png
from blipinpaint.report_tables import Table

HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


def row(k: int, caption: str, finetuned: str, clip_delta: float, psnr: float = 20.0, finetuned_delta: float = 0.0,
        id_: str | None = None) -> dict:
    rng = np.random.default_rng(k)
    image = rng.integers(0, 255, (96, 160, 3), dtype=np.uint8)
    mask = np.zeros((96, 160), dtype=np.uint8)
    mask[20:60, 30:90] = 255
    id_ = id_ or f"img{k:02d}"
    out = {"id": id_, "source": f"/data/{id_}.jpg", "caption": caption, "caption_finetuned": finetuned,
           "mask_area": 0.1 * k, "image_png": encode_png(image), "mask_png": encode_png(mask),
           **{c: encode_png(rng.integers(0, 255, (96, 160, 3), dtype=np.uint8))
              for c in ("inpainted_png", "inpainted_baseline_png", "inpainted_finetuned_png")}}
    for suffix in ("", "_baseline", "_finetuned"):
        out |= {"clip_score" + suffix: 20.0, "ssim" + suffix: 0.5, "psnr" + suffix: psnr}
    out["clip_score"] += clip_delta
    out["clip_score_finetuned"] += clip_delta + finetuned_delta
    return out


ROWS = [row(0, "a red bus on a road", "a red bus", 0.5, finetuned_delta=0.3),
        row(1, "a zebra in the grass", "a zebra in the grass", -1.0),
        row(2, "two dogs", "two dogs running", 2.0, psnr=float("inf"), finetuned_delta=-0.4),
        row(3, HOSTILE, HOSTILE + " changed", 0.1, finetuned_delta=0.9, id_=f"img03 {HOSTILE}"),
        row(4, "a plate of food", "a plate of food", -0.2)]
HOSTILE_ID = ROWS[3]["id"]
BUCKETS = ["<10%", "<10%", "10-30%", ">=30%", ">=30%"]


def build(out_dir, rows=ROWS, errors=()) -> str:
    cards, files = [], {}
    for k, (r, bucket) in enumerate(zip(rows, BUCKETS)):
        card, images = report_page.card(r, k, bucket)
        cards.append(card)
        files.update(images)
    report_page.write_files(str(out_dir), files)
    table = Table(["", f"{HOSTILE}: CLIP score ↑"], [["+ BLIP caption", "20.1"]])
    return report_page.write_page(str(out_dir), {
        "dataset": f"coco {HOSTILE}", "run_dir": f"runs/{HOSTILE}",
        "counts": {"samples": len(rows), "errors": len(errors), "generate_errors": 0, "changed": 3},
        "tables": {"table1": table, "paired": table, "metrics": table, "buckets": table, "caption_effect": table},
        "caption_effect_text": "where it helps", "intervals_text": "intervals", "scorer_text": "scorer",
        "reranked_text": "", "plots": [],
        "gallery": {"cards": cards, "shown": len(cards), "total": 40, "limit": 5,
                    "sort_keys": report_page.sort_keys(["baseline", "blip", "finetuned"]),
                    "buckets": sorted(set(BUCKETS))},
        "errors": {"rows": list(errors), "total": len(errors)},
        "settings": [("run_dir", f"runs/{HOSTILE}")], "config_yaml": f"run_dir: {HOSTILE}"})


def visible_ids(driver) -> list[str]:
    """The visible cards' ids in page order; the hostile one as img03."""
    return [c.get_attribute("data-id").split(" ")[0] for c in driver.find_elements(By.CSS_SELECTOR, "#gallery .card")
            if c.is_displayed()]


def test_a_card_holds_small_thumbnails_and_links_the_full_size_images(tmp_path):
    import base64
    import io

    from PIL import Image

    card, files = report_page.card(ROWS[0], 7, "<10%")
    assert json.loads(card["sort_json"]) == card["sort"]
    assert [im["title"] for im in card["images"]] == ["ground truth", "masked input", "baseline (no text)",
                                                      "BLIP caption", "fine-tuned BLIP caption"]
    assert files["00007-truth.png"] == ROWS[0]["image_png"] and files["00007-blip.png"] == ROWS[0]["inpainted_png"]
    masked = decode_png(files["00007-masked.png"])
    assert (masked[20:60, 30:90] == 127).all() and (masked[:20] == decode_png(ROWS[0]["image_png"])[:20]).all()
    for im in card["images"]:
        assert im["href"].startswith("report_files/00007-")
        thumb = Image.open(io.BytesIO(base64.b64decode(im["thumb"].split(",", 1)[1])))
        assert thumb.size == (128, 77)  # the longer side at 128 px, the aspect kept
    assert card["sort"]["blip_vs_baseline:clip_score"] == pytest.approx(0.5)
    assert card["sort"]["finetuned_vs_blip:clip_score"] == pytest.approx(0.3)
    assert card["changed"] and card["images"][3]["caption"] == "a red bus on a road"
    infinite = report_page.card(ROWS[2], 0, "10-30%")[0]
    assert infinite["sort"]["blip_vs_baseline:psnr"] is None  # an exactly restored hole: no difference to sort by
    unknown = report_page.card({**ROWS[1], "mask_area": float("nan")}, 0, "<10%")[0]
    assert json.loads(unknown["sort_json"])["mask_area"] is None  # valid JSON for the page's script


def test_the_gallery_sorts_and_filters_and_the_errors_search_in_the_page(browser, tmp_path):
    errors = [{"job": "generate", "id": "broken01", "source": "/data/broken01.jpg", "reason": "decode: not an image"},
              {"job": "evaluate", "id": "img09", "source": "/data/img09.jpg", "reason": "stage failed: inpainter"}]
    seen = open_page(browser, build(tmp_path, errors=errors))
    assert seen["console_errors"] == [] and seen["broken_images"] == [] and seen["images"] == 25
    assert {u.split(":", 1)[0] for u in seen["urls"]} <= {"file", "data"}
    assert all(u == f"file://{tmp_path}/report.html" for u in seen["urls"] if u.startswith("file:"))
    assert "The gallery shows 5 of 40 held-out samples" in browser.find_element(By.TAG_NAME, "body").text
    assert visible_ids(browser) == [f"img{k:02d}" for k in range(5)]  # by id at first

    Select(browser.find_element(By.ID, "sort")).select_by_value("blip_vs_baseline:clip_score")
    assert visible_ids(browser) == ["img01", "img04", "img03", "img00", "img02"]  # smallest first
    Select(browser.find_element(By.ID, "order")).select_by_value("desc")
    assert visible_ids(browser) == ["img02", "img00", "img03", "img04", "img01"]
    Select(browser.find_element(By.ID, "sort")).select_by_value("finetuned_vs_blip:clip_score")
    assert visible_ids(browser)[:3] == ["img03", "img00", "img01"] and visible_ids(browser)[-1] == "img02"
    Select(browser.find_element(By.ID, "sort")).select_by_value("mask_area")
    assert visible_ids(browser) == ["img04", "img03", "img02", "img01", "img00"]
    Select(browser.find_element(By.ID, "sort")).select_by_value("blip_vs_baseline:psnr")
    assert visible_ids(browser)[-1] == "img02"  # no difference (an infinite PSNR): last either way

    Select(browser.find_element(By.ID, "sort")).select_by_value("id")
    Select(browser.find_element(By.ID, "order")).select_by_value("asc")
    Select(browser.find_element(By.ID, "bucket")).select_by_value(">=30%")
    assert visible_ids(browser) == ["img03", "img04"]
    Select(browser.find_element(By.ID, "bucket")).select_by_value("")
    Select(browser.find_element(By.ID, "changed")).select_by_value("1")
    assert visible_ids(browser) == ["img00", "img02", "img03"]
    Select(browser.find_element(By.ID, "changed")).select_by_value("")
    browser.find_element(By.ID, "text").send_keys("ZEBRA")
    assert visible_ids(browser) == ["img01"] and browser.find_element(By.ID, "visible").text == "1"
    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "text").send_keys("running")  # in the fine-tuned caption only
    assert visible_ids(browser) == ["img02"]

    rows = browser.find_elements(By.CSS_SELECTOR, "#error-table tbody tr")
    assert len(rows) == 2
    browser.find_element(By.ID, "error-search").send_keys("decode")
    assert [r.is_displayed() for r in rows] == [True, False]
    assert browser.find_element(By.ID, "errors-visible").text == "1"


def test_what_models_and_users_wrote_shows_as_text_and_never_runs(browser, tmp_path):
    errors = [{"job": "generate", "id": f"id {HOSTILE}", "source": HOSTILE, "reason": f"decode: {HOSTILE}"}]
    path = build(tmp_path, errors=errors)
    seen = open_page(browser, path)
    assert seen["console_errors"] == [] and seen["broken_images"] == []
    assert browser.execute_script("return window.pwned") is None
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1  # the page's own
    assert browser.find_elements(By.CSS_SELECTOR, 'img[src="x"]') == []
    card = browser.find_elements(By.CSS_SELECTOR, "#gallery .card")[3]
    assert card.get_attribute("data-id") == HOSTILE_ID  # the id's attribute, whole
    assert HOSTILE_ID in card.find_element(By.TAG_NAME, "header").text
    assert f"/data/{HOSTILE_ID}.jpg" in card.find_element(By.TAG_NAME, "header").text
    assert HOSTILE in card.find_elements(By.TAG_NAME, "figcaption")[3].text  # the caption, as text
    assert HOSTILE + " changed" in card.find_elements(By.TAG_NAME, "figcaption")[4].text
    assert HOSTILE in browser.find_element(By.TAG_NAME, "h1").text
    assert HOSTILE in browser.find_element(By.ID, "error-table").text
    assert "<script>window.pwned" not in open(path).read()  # escaped in the file itself
