"""The audit job (issue 33): the session's main run recomputed and found to hold; a copy with a
committed part altered, found not to, row by row; a model store that changed, refused before
anything is recomputed. (The audit of a bucket run: tests/rayjobs/test_export.py.)"""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import copy_run

from blipinpaint.models import offline
from rayjobs import audit


def _args(run_dir, local_ray, *extra):
    return [f"run_dir={run_dir}", f"ray_address={local_ray.get_runtime_context().gcs_address}", *extra]


def test_the_main_run_holds(main_run, local_ray, tmp_path, capsys):
    """Every row of the embedded default's run, recomputed in fp32 through generate's stages,
    is what the run committed."""
    code = audit.main(_args(main_run[1] / "run", local_ray, "audit.size=100", f"audit.out={tmp_path}"))
    said = capsys.readouterr().out
    assert code == 0, said
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["rows"], report["held"], report["failed"], report["verdict"]) == (6, 6, [], "held")
    assert report["tolerances"] == {"image": 1, "score": 1e-4}  # fp32's
    assert all(row["held"] and not row["differs"] and row["checks"]["caption"]["equal"]
               for row in report["rows_audited"])
    assert report["made_by"]["model_digests"] == json.loads(
        (main_run[1] / "run" / "generate" / "fingerprint.json").read_text())["model_digests"]
    assert "6 of 6 rows held" in said


def test_an_altered_part_fails_the_audit_and_names_the_rows(main_run, local_ray, tmp_path, capsys):
    """One committed part rewritten in place (same name, so its marker still names it): one
    row's caption, another's caption-guided image, a third's PSNR changed, a fourth row gone."""
    copy_run(main_run[1] / "run", tmp_path, ("generate",))
    part = sorted((tmp_path / "generate" / "samples").glob("*.parquet"))[0]
    rows = pq.read_table(part).to_pylist()
    caption, image, score, gone = rows[0], rows[1], rows[2], rows[3]
    caption["caption"] = caption["caption"] + " with a hat"
    image["inpainted_png"] = image["inpainted_baseline_png"]  # the other variant's pixels
    score["psnr"] = score["psnr"] + 0.5
    pq.write_table(pa.Table.from_pylist([r for r in rows if r is not gone], schema=pq.read_schema(part)), part)

    code = audit.main(_args(tmp_path, local_ray, "audit.size=100"))
    said = capsys.readouterr().out
    assert code == 1, said
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert report["verdict"] == "did not hold"
    assert report["failed"] == sorted(r["id"] for r in (caption, image, score, gone))
    assert report["held"] == len(rows) - 4
    by_id = {r["id"]: r for r in report["rows_audited"]}
    assert [line.split(":")[0] for line in by_id[caption["id"]]["differs"]] == ["caption"]
    assert [line.split(":")[0] for line in by_id[image["id"]]["differs"]] == ["inpainted"]
    assert by_id[image["id"]]["checks"]["inpainted"]["max_diff"] > 1  # by how much: past fp32's tolerance
    assert by_id[score["id"]]["differs"] == [f"psnr: {score['psnr']:.6g} recorded, {score['psnr'] - 0.5:.6g} "
                                             "recomputed (differs by 0.5, tolerance 0.0001)"]
    assert by_id[gone["id"]]["differs"] == ["the part its commit marker names does not hold it (altered after "
                                            "its commit)"]
    for row in (caption, image, score, gone):
        assert f"  {row['id']}: DIFFERS" in said
    assert "the run did not hold" in said


def test_a_model_store_that_changed_is_refused_before_recomputing(main_run, local_ray, tmp_path, monkeypatch,
                                                                  capsys):
    """The tiny preset's store (the offline cache) with one byte of the captioner's weights
    changed: the audit names the captioner and recomputes nothing."""
    cache = tmp_path / "cache"
    built = offline.ensure_built("tiny")
    shutil.copytree(built, cache / "offline" / built.name)
    weights = cache / "offline" / built.name / "captioner" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    monkeypatch.setenv("BLIPINPAINT_CACHE", str(cache))

    code = audit.main(_args(main_run[1] / "run", local_ray, f"audit.out={tmp_path / 'audit'}"))
    said = capsys.readouterr().err
    assert code == 2
    assert "the model store does not hold the models the run used; nothing was recomputed" in said
    lines = [line.strip() for line in said.splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 1 and lines[0].startswith("- captioner: the run used ")
    assert not (tmp_path / "audit").exists()
