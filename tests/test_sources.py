import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import encode, photo, write_shard

from blipinpaint.source_reads import read_files
from blipinpaint.sources import SourceError, contained, items_to_batch, list_inputs
from blipinpaint.storage import upload_dir


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "images"
    (root / "VG_100K").mkdir(parents=True)
    (root / "VG_100K_2").mkdir()
    for rel in ("a.jpg", "VG_100K/1.jpg", "VG_100K_2/2.png", "notes.txt"):
        (root / rel).write_bytes(rel.encode())
    return root


def test_folder_lists_images_with_relative_ids(tree):
    items = list_inputs(str(tree))
    assert [i["id"] for i in items] == ["VG_100K/1.jpg", "VG_100K_2/2.png", "a.jpg"]  # no .txt
    assert all(i["source"].startswith(str(tree)) and not i["error"] for i in items)
    # The same folder as a URI goes through pyarrow's URI filesystems (as s3:// does).
    uri_items = list_inputs(f"file://{tree}")
    assert [i["id"] for i in uri_items] == [i["id"] for i in items]
    assert read_files(items_to_batch(uri_items))["bytes"][2] == b"a.jpg"


def test_coco_annotations(tree, tmp_path):
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "gone.jpg"}],
                               "annotations": []}))
    items = list_inputs(str(ann), image_root=str(tree))
    assert [i["id"] for i in items] == ["a.jpg", "gone.jpg"]
    batch = read_files(items_to_batch(items))
    assert batch["bytes"][0] == b"a.jpg"
    assert batch["error"][1].startswith("read failed:") and batch["bytes"][1] == b""
    with pytest.raises(SourceError, match="data.image_root must be set"):
        list_inputs(str(ann))


def test_visualgenome_image_data(tree, tmp_path):
    data = tmp_path / "image_data.json"
    data.write_text(json.dumps([
        {"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg", "width": 800},
        {"image_id": 2, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.png", "width": 800},
    ]))
    items = list_inputs(str(data), image_root=str(tree))
    assert [(i["id"], i["source"]) for i in items] == [
        ("1", f"{tree}/VG_100K/1.jpg"), ("2", f"{tree}/VG_100K_2/2.png")]


def test_manifest_paths_stay_inside_the_root_and_ids_stay_unique(tree):
    manifest = tree / "manifest.parquet"
    pq.write_table(pa.table({
        "id": ["x", "y", "x", "z", "w"],
        "path": ["a.jpg", "VG_100K/1.jpg", "VG_100K_2/2.png", "../../etc/passwd", "/etc/hostname"],
    }), manifest)
    items = {i["id"]: i for i in list_inputs(str(manifest))}  # root: the manifest's folder
    assert items["x"]["source"] == f"{tree}/a.jpg" and not items["x"]["error"]
    assert items["x#2"]["error"].startswith("duplicate id: 'x'")
    assert items["z"]["error"].startswith("bad path:") and items["w"]["error"].startswith("bad path:")
    assert len(items) == 5  # every manifest row is accounted for
    batch = read_files(items_to_batch(list(items.values())))
    assert all(b == b"" for b, e in zip(batch["bytes"], batch["error"]) if e)  # nothing outside was read


def test_contained():
    assert contained("/data/imgs", "a/b.jpg") == "/data/imgs/a/b.jpg"
    assert contained("/data/imgs", "a/../../imgs2/x.jpg") is None
    assert contained("/data/imgs", "/data/imgs/c.jpg") == "/data/imgs/c.jpg"
    assert contained("s3://bucket/coco", "val/1.jpg") == "s3://bucket/coco/val/1.jpg"
    assert contained("s3://bucket/coco", "../other/1.jpg") is None


def test_limit_is_a_stable_seeded_subset(tmp_path):
    for i in range(30):
        (tmp_path / f"{i:02d}.jpg").write_bytes(b"x")
    first = [i["id"] for i in list_inputs(str(tmp_path), limit=5, seed=1)]
    assert first == [i["id"] for i in list_inputs(str(tmp_path), limit=5, seed=1)]
    assert first != ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]  # not just the first names
    assert first != [i["id"] for i in list_inputs(str(tmp_path), limit=5, seed=2)]
    assert first == sorted(first)


def test_unusable_sources_are_reported(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list_inputs(str(tmp_path / "missing"))
    odd = tmp_path / "odd.json"
    odd.write_text('{"something": 1}')
    with pytest.raises(SourceError, match="cannot tell what data.source"):
        list_inputs(str(odd))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(SourceError, match="cannot read"):
        list_inputs(str(broken))


JPEGS = [encode(photo(64, 48, seed=k), "JPEG") for k in range(4)]


@pytest.fixture
def shards(tmp_path):
    """Two WebDataset shards: carried members, a key with no image, a corrupt image member,
    and a second shard cut off in its second member's data."""
    root = tmp_path / "shards"
    root.mkdir()
    write_shard(root / "00000.tar", [
        ("000.jpg", JPEGS[0]), ("000.txt", b"a red kite"), ("000.json", b'{"w": 64}'),
        ("sub/001.png", JPEGS[1]), ("002.txt", b"only a caption"), ("003.jpg", b"not a jpeg at all"),
        ("caf\udce9.jpg", JPEGS[3])])  # a Latin-1 member name
    first = 512 + -(-len(JPEGS[2]) // 512) * 512  # header and padded data of the first member
    write_shard(root / "00001.tar", [("010.jpg", JPEGS[2]), ("011.jpg", JPEGS[3])], cut=first + 512 + 100)
    return root


def test_webdataset_shards_by_pattern_with_carried_members_and_bad_members(shards):
    items = {i["id"]: i for i in list_inputs(f"{shards}/{{00000..00001}}.tar")}
    assert list(items) == ["00000.tar/000", "00000.tar/002", "00000.tar/003", "00000.tar/caf\\xe9",
                           "00000.tar/sub/001", "00001.tar", "00001.tar/010", "00001.tar/011"]
    assert json.loads(items["00000.tar/000"]["annotations"]) == {"txt": "a red kite", "json": '{"w": 64}'}
    assert items["00000.tar/002"]["error"] == (f"no image: {shards}/00000.tar key '002' has members ['txt'], "
                                              "none an image")
    # The cut shard: what was listed before the cut stays; the rest is one error row naming it.
    assert items["00001.tar"]["error"].startswith(f"corrupt tar: {shards}/00001.tar cannot be read past key '011'")
    assert items["00000.tar/sub/001"]["source"] == f"{shards}/00000.tar#sub/001.png"
    batch = read_files(items_to_batch(list(items.values())))
    got = dict(zip(batch["id"], zip(batch["bytes"], batch["error"])))
    assert got["00000.tar/000"] == (JPEGS[0], "") and got["00000.tar/sub/001"] == (JPEGS[1], "")
    assert got["00000.tar/003"] == (b"not a jpeg at all", "")  # the decoder makes it a `corrupt image` row
    assert got["00001.tar/010"] == (JPEGS[2], "") and got["00000.tar/caf\\xe9"] == (JPEGS[3], "")
    assert items["00000.tar/caf\\xe9"]["source"] == f"{shards}/00000.tar#caf\\xe9.jpg"  # UTF-8 text, as Parquet needs
    assert got["00001.tar/011"][1].startswith("read failed:") and "00001.tar ends" in got["00001.tar/011"][1]
    # A folder of shards is the same source; so is `auto` on a pattern or a folder.
    assert [i["id"] for i in list_inputs(str(shards), kind="webdataset")] == list(items)
    assert [i["id"] for i in list_inputs(str(shards))] == list(items)
    # Cut inside a header, tarfile would see an end: the missing end-of-archive blocks tell.
    first = 512 + -(-len(JPEGS[2]) // 512) * 512
    write_shard(shards / "00001.tar", [("010.jpg", JPEGS[2]), ("011.jpg", JPEGS[3])], cut=first + 200)
    cut = {i["id"]: i["error"] for i in list_inputs(str(shards / "00001.tar"))}
    assert cut["00001.tar/010"] == "" and cut["00001.tar"].startswith("corrupt tar:")
    assert "without the end-of-archive blocks" in cut["00001.tar"]
    big = read_files(items_to_batch([items["00000.tar/000"]]), max_mb=len(JPEGS[0]) / 2 / 2**20)
    assert big["error"][0].startswith("too large") and big["bytes"][0] == b""


def test_parquet_images_as_bytes_or_hub_structs_with_bad_cells(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    cells = [{"bytes": JPEGS[0], "path": "a.jpg"}, {"bytes": None, "path": "gone.jpg"}, None,
             {"bytes": JPEGS[1], "path": "b.jpg"}, {"bytes": JPEGS[2], "path": "c.jpg"}]
    pq.write_table(pa.table({"image": cells, "key": ["a", "b", "c", "d", "e"]}), root / "train-0.parquet",
                   row_group_size=2)  # three row groups: a batch reads the ones it needs
    pq.write_table(pa.table({"image": pa.array([JPEGS[3], b"garbage"], pa.binary()), "key": ["f", None]}),
                   root / "train-1.parquet")
    items = list_inputs(str(root), kind="parquet_images")
    assert [i["id"] for i in items] == [f"train-0.parquet/{r}" for r in range(5)] + ["train-1.parquet/0",
                                                                                      "train-1.parquet/1"]
    batch = read_files(items_to_batch(items[::-1]))  # any order: cells go back to their rows
    got = dict(zip(batch["id"], zip(batch["bytes"], batch["error"])))
    assert got["train-0.parquet/0"] == (JPEGS[0], "") and got["train-0.parquet/4"] == (JPEGS[2], "")
    assert got["train-1.parquet/0"] == (JPEGS[3], "") and got["train-1.parquet/1"] == (b"garbage", "")
    assert got["train-0.parquet/1"][1] == f"bad cell: {root}/train-0.parquet row 1: 'image' holds no image bytes"
    assert got["train-0.parquet/2"][1].startswith("bad cell:")
    keyed = {i["id"]: i for i in list_inputs(f"{root}/train-{{0..1}}.parquet", id_column="key")}
    assert list(keyed) == ["a", "b", "c", "d", "e", "f", "train-1.parquet/1"]
    assert keyed["train-1.parquet/1"]["error"] == f"no id: {root}/train-1.parquet row 1 has a null 'key'"
    assert keyed["d"]["source"] == f"{root}/train-0.parquet#row=3"
    with pytest.raises(SourceError, match="has no column 'img'"):
        list_inputs(str(root), kind="parquet_images", image_column="img")
    assert list_inputs(f"{root}/train-1.parquet")[0]["id"] == "train-1.parquet/0"  # auto: not a manifest


def test_shards_and_parquet_images_in_a_bucket(shards, tmp_path, s3):
    bucket = s3("sharded-inputs")
    upload_dir(shards, f"{bucket}/shards")
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"image": pa.array(JPEGS[:2], pa.binary())}), tmp_path / "pq" / "x.parquet")
    upload_dir(tmp_path / "pq", f"{bucket}/images")
    items = list_inputs(f"{bucket}/shards/{{00000..00001}}.tar")
    batch = read_files(items_to_batch(items))
    assert dict(zip(batch["id"], batch["bytes"]))["00000.tar/sub/001"] == JPEGS[1]
    assert items[0]["source"] == f"{bucket}/shards/00000.tar#000.jpg"
    batch = read_files(items_to_batch(list_inputs(f"{bucket}/images")))
    assert list(batch["id"]) == ["x.parquet/0", "x.parquet/1"] and list(batch["bytes"]) == JPEGS[:2]
