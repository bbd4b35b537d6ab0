"""The exported forms of a sample (`export_formats`) and the shard plan (`shards.plan`), without a run."""

import io
import json
import tarfile

import datasets
import pyarrow as pa

from blipinpaint.export_formats import HF_FIELDS, Hashed, add_member, hf_schema, licence_of, sample_key
from blipinpaint.shards import plan


def test_keys_are_safe_tar_stems_and_unique_for_ids_that_read_alike():
    ids = ["astronaut.jpg", "astronaut_jpg", "shards/00001.tar/000042", "caf\\xe9 (1).png", "a" * 300]
    keys = [sample_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    # WebDataset cuts a member name at its base name's first dot: a key holds no dot and no slash.
    assert all("." not in k and "/" not in k and len(k) <= 65 for k in keys)
    assert keys[0].startswith("astronaut_jpg-") and sample_key(ids[0]) == keys[0]  # the same id, the same key


def test_a_licence_is_read_from_what_a_webdataset_source_carried():
    carried = {"json": json.dumps({"caption": "x", "LICENSE": "CC BY 4.0"}), "txt": "a cat"}
    assert licence_of(json.dumps(carried)) == "CC BY 4.0"
    assert licence_of(json.dumps({"json": json.dumps({"license": ""})})) == ""
    assert licence_of("") == licence_of("not json") == licence_of(json.dumps({"txt": "licence: MIT"})) == ""


def test_datasets_reads_the_image_columns_as_images():
    features = datasets.Features.from_arrow_schema(hf_schema({"generate_fingerprint": "x"}))
    images = [name for name, type_ in HF_FIELDS if pa.types.is_struct(type_)]
    assert images == ["image", "mask", "inpainted", "inpainted_baseline"]
    assert all(isinstance(features[name], datasets.Image) for name in images)
    assert features["psnr"] == datasets.Value("float32") and features["caption"] == datasets.Value("string")


def test_a_shard_written_twice_is_the_same_bytes():
    def shard() -> tuple[bytes, dict]:
        buffer = io.BytesIO()
        hashed = Hashed(buffer)
        with tarfile.open(fileobj=hashed, mode="w|") as tar:
            for name, data in (("k-1.txt", b"a cat"), ("k-1.image.png", b"\x89PNG..."), ("k-2.txt", b"a dog")):
                add_member(tar, name, data)
        return buffer.getvalue(), hashed.record()

    (first, record), (second, _) = shard(), shard()
    assert first == second
    assert record["size"] == len(first)


def test_the_plan_cuts_each_split_in_order_into_named_shards():
    splits = {"train": [{"path": "p1", "ids": ["a", "b", "c"]}, {"path": "p2", "ids": ["d"]}],
              "heldout": [{"path": "p1", "ids": ["e"]}]}
    shards = plan(splits, 2)
    assert [s["name"] for s in shards] == ["train-00000-of-00002", "train-00001-of-00002", "heldout-00000-of-00001"]
    assert [s["ids"] for s in shards] == [["a", "b"], ["c", "d"], ["e"]]
    assert shards[1]["reads"] == [{"path": "p1", "ids": ["c"]}, {"path": "p2", "ids": ["d"]}]
    assert plan(splits, 2) == shards
    assert [s["name"] for s in plan({"train": splits["train"], "heldout": []}, 10)] == ["train-00000-of-00001"]
