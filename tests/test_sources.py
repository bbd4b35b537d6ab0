import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blipinpaint.sources import SourceError, contained, items_to_batch, list_inputs, read_files


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
