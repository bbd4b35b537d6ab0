"""The path a cluster user runs, rehearsed offline: `models.preset=paper` from the pinned repos'
real file layouts (tiny weights, `paper_hub`), half precision as bf16 on CPU, the inputs and
`run_dir` in buckets of an S3 endpoint on 127.0.0.1 (the model store, Ray Train's
checkpoints and every job's output with them), every job; and the paper configs' inputs,
COCO and VisualGenome annotations with their images in a bucket.

The models step reads the hub cache; then the cache is taken away and the main job runs:
any job or worker that reached for the hub (or for a file the store did not convert)
would fail. Only the FID network is the offline one: the standard Inception's weights
cannot exist here.
"""

import contextlib
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from helpers import open_page
from pyarrow import fs as pafs
from safetensors.torch import load_file

from blipinpaint.config import load_config, sample_images_dir
from blipinpaint.models import offline
from blipinpaint.models.presets import PAPER
from blipinpaint.source_reads import read_files
from blipinpaint.sources import items_to_batch, list_inputs
from blipinpaint.storage import filesystem, read_text, upload_dir
from rayjobs import audit, generate, models, pipeline

# The fine-tune runs as the hardest case: ZeRO-3 in bf16 with the KL term.
RUN = ["models.preset=paper", "models.dtype=bf16", "data.image_size=64", "inpaint.num_inference_steps=2",
       "caption.max_new_tokens=8", "scorer.epochs=2", "scorer.hidden=[16]", "finetune.epochs=1",
       "finetune.batch_size=4", "finetune.kl_weight=0.1", "train.zero_stage=3"]


@contextlib.contextmanager
def hub_away(paper_hub):
    """The hub unreachable for the driver and every worker while the block runs."""
    away = paper_hub.with_name(paper_hub.name + "-away")
    os.rename(paper_hub, away)
    try:
        yield
    finally:
        os.rename(away, paper_hub)


@pytest.fixture(scope="module")
def rehearsal(local_ray, paper_hub, s3, tmp_path_factory):
    inputs, runs = s3("rehearsal-inputs"), s3("rehearsal-runs")
    upload_dir(sample_images_dir(), f"{inputs}/photos")
    args = [f"run_dir={runs}/paper", f"data.source={inputs}/photos", *RUN,
            f"models.fid.name_or_path={offline.ensure_built('tiny') / 'fid'}"]
    assert models.main(args) == 0
    with hub_away(paper_hub):
        code = pipeline.main(args)
    # What a user downloads from the bucket, to look at here.
    run_dir = tmp_path_factory.mktemp("paper-run")
    fs, path = filesystem(f"{runs}/paper")
    pafs.copy_files(path, str(run_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return code, run_dir, args


def test_every_job_runs_on_the_paper_layout_in_bf16_without_the_hub(rehearsal, browser):
    code, run_dir, _ = rehearsal
    assert code == 0
    stats = json.loads((run_dir / "generate" / "stats.json").read_text())
    assert (stats["inputs"], stats["ok"], stats["errors"]) == (6, 6, 0)
    samples = pq.read_table(run_dir / "generate" / "samples").to_pylist()
    assert {r["captioner_model"] for r in samples} == {f"{PAPER.captioner.name_or_path}@{PAPER.captioner.revision}"}
    assert all(r["caption"] and len(r["caption_features"]) == 32 for r in samples)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    held_out = report["evaluation_set"]["samples"]
    assert held_out >= 2
    assert all(report["variants"][v]["samples"] == held_out for v in ("baseline", "blip", "finetuned"))
    assert "not the standard Inception" in report["fid_protocol"]  # the offline FID network, said so
    # The page, downloaded from the bucket, opens whole: a card per sample, each image a click away.
    seen = open_page(browser, run_dir / "eval" / "report.html")
    assert seen["console_errors"] == [] and seen["broken_images"] == []
    assert len(list((run_dir / "eval" / "report_files").glob("*-truth.png"))) == held_out
    # The inputs were read from their bucket; checkpoints and every part were written to the
    # run's, every staged file published; no credential went into any output.
    assert all(r["source"].startswith("s3://rehearsal-inputs/photos/") for r in samples)
    assert {p.parents[2].name for p in run_dir.glob("*/ray_train/*/checkpoint_*")} == {"scorer", "finetune"}
    assert not [p for p in run_dir.glob("*/_staging/**/*") if p.is_file()]
    texts = [p for p in run_dir.rglob("*") if p.suffix in (".json", ".jsonl", ".yaml", ".md", ".txt", ".html")]
    assert len(texts) > 10
    for secret in (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]):
        assert not [p for p in texts if secret in p.read_text(errors="replace")]


def test_the_store_holds_only_safetensors_weights(rehearsal):
    _, run_dir, _ = rehearsal
    store = run_dir / "models"
    files = sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file())
    weights = [f for f in files if f.rsplit(".", 1)[-1] in ("safetensors", "bin", "pth", "pt", "h5", "msgpack", "ckpt")]
    assert weights and all(f.endswith(".safetensors") for f in weights), weights
    assert sum(f.endswith("_store.json") for f in files) == 3  # captioner, inpainter, CLIP; FID is the offline one


def test_the_scorer_trains_in_fp32_on_fp32_features(rehearsal):
    """Point 3: a bf16 run used to cast the MLP to bf16 and feed it the cached fp32 features."""
    _, run_dir, _ = rehearsal
    state = load_file(run_dir / "scorer" / "model" / "model.safetensors")
    assert {t.dtype for t in state.values()} == {torch.float32}
    records = [json.loads(line) for line in (run_dir / "scorer" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["train_loss"] > 0 for r in records)


def test_bf16_fine_tuning_saves_the_fp32_master_weights(rehearsal):
    """Point 6: at lr 1e-6 an update is far below half a bf16 ulp. The saved decoder must be the
    original fp32 weights plus the updates, not the bf16 copy (nor a master copied from it)."""
    _, run_dir, _ = rehearsal
    original = load_file(next((run_dir / "models").glob("Salesforce--*/*/model.safetensors")))
    tuned = load_file(run_dir / "blip" / "model.safetensors")
    steps = json.loads((run_dir / "finetune" / "report.json").read_text())["steps"]
    lr = load_config().finetune.lr
    decoder = [k for k in tuned if k.startswith("text_decoder.") and k in original and tuned[k].is_floating_point()]
    moved = max((tuned[k] - original[k]).abs().max().item() for k in decoder)
    # Adam moves each weight by at most ~lr per step; bf16 rounding alone would move them ~1e-4.
    assert 0 < moved <= 1.5 * lr * steps, (moved, steps)
    assert all(torch.equal(tuned[k], original[k]) for k in tuned if k.startswith("vision_model."))


def test_bf16_zero3_fine_tuning_with_the_kl_term(rehearsal):
    """Point 5: the KL reference runs in the engine's dtype (it crashed in the reference's
    cross-attention), under ZeRO-3. Its resume after a worker death: test_finetune_blip."""
    _, run_dir, _ = rehearsal
    report = json.loads((run_dir / "finetune" / "report.json").read_text())
    records = [json.loads(line) for line in (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]  # the steps, not the probe's lines
    assert report["engine"]["zero_stage"] == 3 and report["engine"]["dtype"] == "bfloat16"
    assert records and all(r["kl"] >= 0 and r["loss"] == pytest.approx(r["loss_blip"] + 0.1 * r["kl"], rel=1e-5,
                                                                       abs=1e-6) for r in records)


def test_the_bf16_fine_tune_is_evaluated_at_the_precision_it_learned_in(rehearsal):
    """Issue 32: beside the bf16 vision encoder and inpainter, BLIP's decoder captions in fp32
    (`caption.decoder_dtype`) in generate and evaluate: every change the lr 1e-6 fine-tune made
    survives, where a bf16 cast would keep a few of them. Both reports count them as the files do."""
    _, run_dir, _ = rehearsal
    original = load_file(next((run_dir / "models").glob("Salesforce--*/*/model.safetensors")))
    tuned = load_file(run_dir / "blip" / "model.safetensors")
    decoder = [k for k in tuned if k.startswith("text_decoder.") and k in original and tuned[k].is_floating_point()]
    changed = sum(int((tuned[k] != original[k]).sum()) for k in decoder)
    at_bf16 = sum(int(((tuned[k] != original[k]) & (tuned[k].bfloat16() != original[k].bfloat16())).sum())
                  for k in decoder)
    evaluation = json.loads((run_dir / "eval" / "report.json").read_text())["decoder_precision"]
    assert json.loads((run_dir / "finetune" / "report.json").read_text())["decoder_precision"] == evaluation
    assert (evaluation["dtype"], evaluation["changed"], evaluation["survived"]) == ("fp32", changed, changed)
    # bf16 keeps about a tenth here: weights near 0 (biases start at 0), whose ulp is small.
    assert changed > 0 and at_bf16 < 0.25 * changed
    assert "Both captions' text decoders ran in fp32" in (run_dir / "eval" / "report.md").read_text()


# The paper configs' inputs as they lie in a bucket: annotations that name files below `image_root`
# (configs/paper-coco.yaml, paper-vg.yaml); one of COCO's names a file that is not there.
ANNOTATED = {
    "coco": ({"images": [{"id": 1, "file_name": "astronaut.jpg"}, {"id": 2, "file_name": "chelsea.jpg"},
                         {"id": 3, "file_name": "000000000139.jpg"}], "annotations": []},
             "annotations/instances_train2017.json", "train2017",
             {"astronaut.jpg": "astronaut.jpg", "chelsea.jpg": "chelsea.jpg"}),
    "visualgenome": ([{"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg"},
                      {"image_id": 2, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg"}],
                     "image_data.json", "", {"VG_100K/1.jpg": "coffee.jpg", "VG_100K_2/2.jpg": "rocket.jpg"}),
}


def annotated_in_a_bucket(s3, tmp_path, kind: str) -> tuple[str, str]:
    """The dataset of `kind` uploaded to a bucket: (its annotations' URI, its image_root)."""
    annotations, name, root, files = ANNOTATED[kind]
    local = tmp_path / kind
    for target, sample in files.items():
        (local / root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_images_dir() / sample, local / root / target)
    (local / name).parent.mkdir(parents=True, exist_ok=True)
    (local / name).write_text(json.dumps(annotations))
    bucket = s3(f"rehearsal-{kind}")
    upload_dir(local, f"{bucket}/datasets/{kind}")
    return f"{bucket}/datasets/{kind}/{name}", f"{bucket}/datasets/{kind}/{root}".rstrip("/")


def test_coco_annotations_with_their_images_in_a_bucket(rehearsal, paper_hub, s3, tmp_path):
    """paper-coco.yaml's input, through a short generate: the annotations read from the bucket by
    the driver, the files they name from `image_root` in the bucket by the read tasks, the models
    from the rehearsal's store; the missing file an error row."""
    source, image_root = annotated_in_a_bucket(s3, tmp_path, "coco")
    _, _, args = rehearsal
    store = next(a for a in args if a.startswith("run_dir=")).split("=", 1)[1] + "/models"
    same = [a for a in args if not a.startswith(("run_dir=", "data.source="))]  # models, precision, sizes
    run = source.split("/datasets/")[0] + "/runs/coco"
    with hub_away(paper_hub):
        assert generate.main([f"run_dir={run}", f"data.source={source}", f"data.image_root={image_root}",
                              f"models.store={store}", *same]) == 0
    fs, path = filesystem(f"{run}/generate")
    pafs.copy_files(path, str(tmp_path / "run"), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert (stats["inputs"], stats["ok"], stats["errors"]) == (3, 2, 1)
    samples = pq.read_table(tmp_path / "run" / "samples").to_pylist()
    assert sorted((r["id"], r["source"]) for r in samples) == [
        (name, f"{image_root}/{name}") for name in ("astronaut.jpg", "chelsea.jpg")]
    assert all(r["caption"] for r in samples)
    errors = pq.read_table(tmp_path / "run" / "errors").to_pylist()
    assert [(e["id"], e["source"]) for e in errors] == [("000000000139.jpg", f"{image_root}/000000000139.jpg")]
    assert errors[0]["error"].startswith("read failed")


def test_visualgenome_image_data_with_its_images_in_a_bucket(s3, tmp_path):
    """paper-vg.yaml's input: listed (the only step that differs by source kind; the COCO test
    above runs the rest) and read from the bucket, each file at its VG_100K* path."""
    source, image_root = annotated_in_a_bucket(s3, tmp_path, "visualgenome")
    cfg = load_config(overrides=[f"data.source={source}", f"data.image_root={image_root}"])
    items = list_inputs(cfg.data.source, cfg.data.kind, cfg.data.image_root)
    assert [(i["id"], i["source"]) for i in items] == [("1", f"{image_root}/VG_100K/1.jpg"),
                                                        ("2", f"{image_root}/VG_100K_2/2.jpg")]
    batch = read_files(items_to_batch(items))
    assert not any(batch["error"])
    assert [bytes(b) for b in batch["bytes"]] == [(sample_images_dir() / f).read_bytes()
                                                  for f in ("coffee.jpg", "rocket.jpg")]


def test_the_rehearsed_run_audits_from_its_bucket(rehearsal, capsys):
    """The audit on the path a cluster user runs (issue 33): the store's models checked by their
    manifests in the bucket, two rows recomputed in bf16 from the paper layout, their inputs
    read from their bucket, the report written to the run's."""
    _, _, args = rehearsal
    code = audit.main([*args, "audit.size=2"])
    said = capsys.readouterr().out
    assert code == 0, said
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("run_dir="))
    report = json.loads(read_text(f"{run_dir}/audit/report.json"))
    assert (report["rows"], report["held"]) == (2, 2)
    assert report["tolerances"] == {"image": 8, "score": 0.05}  # bf16's
    fingerprint = json.loads(read_text(f"{run_dir}/generate/fingerprint.json"))
    assert report["made_by"]["model_digests"] == fingerprint["model_digests"]
