"""The report's tables from made-up summaries: a row per variant and per paired difference,
a column group per dataset, n/a where a figure was not taken."""

import numpy as np
import pytest
from test_evaluation import PAPER_VARIANTS, columns, fid

from blipinpaint.evaluation import ALL, DELTA_LABELS, VARIANTS, summarize
from blipinpaint.report_tables import Table, bucket_table, fmt, fmt_interval, metrics_table, paired_table, table1


def test_numbers_keep_their_digits_and_small_ones_their_significant_digits():
    assert (fmt(None), fmt(0), fmt(46.7), fmt(0.000249), fmt(0.5, 3)) == ("n/a", "0.00", "46.70", "0.000249", "0.500")
    assert fmt_interval(None) == fmt_interval({"estimate": None}) == "n/a"
    assert fmt_interval({"estimate": 0.5, "low": None, "high": None}, sign=True) == "+0.50"
    assert fmt_interval({"estimate": -0.5, "low": -1.0, "high": 0.25}, 3, sign=True) == "-0.500 [-1.000, 0.250]"


def test_a_table_is_its_markdown_and_keeps_its_cells():
    table = Table(["samples", "difference", "n"], [["all", "a | b", "3"]], left=2)
    assert table == "| samples | difference | n |\n|---|---|---:|\n| all | a \\| b | 3 |"
    assert (table.header, table.rows, table.left) == (["samples", "difference", "n"], [["all", "a | b", "3"]], 2)


def test_table1_has_a_row_per_variant_and_columns_per_dataset():
    summaries = {"MSCOCO": summarize(columns(), fid(46.7), [0.1, 0.3]),
                 "VisualGenome": summarize(columns(), fid(0.000249), [0.1, 0.3])}
    table = table1(summaries).splitlines()
    assert table[0].count("CLIP score ↑") == 2 and "VisualGenome: FID ↓" in table[0]
    rows = table[2:]
    assert [r.split("|")[1].strip() for r in rows] == [VARIANTS[k].label for k in PAPER_VARIANTS] + [
        f"{DELTA_LABELS[d]} (paired)" for d in ("blip_vs_baseline", "finetuned_vs_blip")]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 6 and "n/a" not in cells and all(cells)
        assert cells[2] == cells[5] == "6"
        assert cells[0].count("[") == 1  # the CLIP score with its interval
    first = [c.strip() for c in rows[0].strip("|").split("|")[1:]]
    assert (first[1], first[4]) == ("46.70", "0.000249")
    assert rows[3].split("|")[3].strip() == "0.00"  # the FID difference, for now without an interval
    assert "n/a" not in metrics_table(summaries["MSCOCO"])
    assert bucket_table(summaries["MSCOCO"]).count("n/a") == 3  # the one-image bucket's FIDs


def test_the_reranked_variant_joins_every_table_where_its_rows_have_it():
    """With `caption.candidates` above 1 the rows carry the reranked variant: it gets a row in
    Table 1, the metrics and bucket tables, and its paired difference against BLIP; a dataset
    evaluated without it shows n/a in its columns of the same Table 1."""
    cols = columns(variants=(*PAPER_VARIANTS, "reranked"))
    with_reranked = summarize(cols, fid(3.0), [0.1, 0.3], (100, 0, 0.95))
    plain = summarize(columns(), fid(3.0), [0.1, 0.3], (100, 0, 0.95))
    assert list(with_reranked["variants"]) == [*PAPER_VARIANTS, "reranked"] and list(plain["variants"]) == [
        *PAPER_VARIANTS]
    delta = with_reranked["intervals"][ALL]["reranked_vs_blip"]["ssim"]
    assert delta["estimate"] == pytest.approx(float(np.mean(cols["ssim_reranked"].astype(np.float64)
                                                             - cols["ssim"].astype(np.float64))))
    assert "reranked_vs_blip" not in plain["intervals"][ALL]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")[1:]]
            for r in table1({"A": with_reranked, "B": plain}).splitlines()[2:]}
    assert list(rows) == [VARIANTS[k].label for k in (*PAPER_VARIANTS, "reranked")] + [
        f"{DELTA_LABELS[d]} (paired)" for d in ("blip_vs_baseline", "finetuned_vs_blip", "reranked_vs_blip")]
    reranked = rows["+ scorer-reranked caption"]
    assert reranked[:3] != ["n/a", "n/a", "0"] and reranked[3:] == ["n/a", "n/a", "0"]
    assert rows["reranked − BLIP (paired)"][3:] == ["n/a", "n/a", "0"]
    assert "+ scorer-reranked caption" in metrics_table(with_reranked)
    assert "reranked: CLIP ↑" in bucket_table(with_reranked) and "reranked" not in bucket_table(plain)
    assert "reranked − BLIP" in paired_table(with_reranked) and "reranked" not in paired_table(plain)
