import json
import subprocess
import sys

import numpy as np
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
    # A limit below the row group's size: its page headers are read from the bucket, then its rows.
    limited = read_files(items_to_batch(list_inputs(f"{bucket}/images")), max_mb=max(map(len, JPEGS[:2])) / MB)
    assert list(limited["error"]) == ["", ""] and list(limited["bytes"]) == JPEGS[:2]


# A Parquet page that would bring more than the limit into memory is refused before it is read,
# as a file over data.max_file_mb is: its header says what it would take. A reader decodes a
# page whole, and pyarrow writes up to 1024 cells in one (the dictionary page): so a page of
# several cells may take up to PAGE_FILES x the limit, a page of one cell the limit.

READ = """
import json, sys
from blipinpaint.source_reads import read_files
from blipinpaint.sources import items_to_batch, list_inputs
def peak_mb():  # this process image's own peak (ru_maxrss would start at pytest's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
batch = items_to_batch(list_inputs(sys.argv[1], kind="parquet_images"))
before = peak_mb()
out = read_files(batch, max_mb=float(sys.argv[2]))
print(json.dumps({"growth_mb": peak_mb() - before,
                  "rows": {i: [len(b), e] for i, b, e in zip(out["id"], out["bytes"], out["error"])}}))
"""

MB = 2**20


def read_in_a_fresh_process(source, max_mb: float) -> tuple[float, dict[str, list]]:
    """(growth of the peak resident memory in MB, id -> [bytes read, error]) of reading every
    cell of `source` in one batch, in a new process."""
    out = subprocess.run([sys.executable, "-c", READ, str(source), str(max_mb)], capture_output=True, text=True,
                         check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["growth_mb"], result["rows"]


def cells(*sizes_mb: float, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)  # random bytes: they do not compress, as images do not
    return [rng.bytes(int(mb * MB)) for mb in sizes_mb]


def test_parquet_cells_over_the_limit_are_refused_before_their_pages_are_read(tmp_path):
    """data.max_file_mb=4. pyarrow's default layout (a row group's cells in one dictionary
    page): a 60 MB cell beside three of 1 MB is refused with its row group, unread; a 5 MB cell
    beside three of 1 MB (an 8 MB page) is read and refused alone. A page a cell (as
    parquet-mr and others write; v1 and v2 pages): an 80 MB cell is refused unread; the rows
    after it in its row group cannot be reached without it; the rest are read. Reading this
    batch took 690 MB; now about 40 (the 8 MB page, and the 13 cells of 1 MB it keeps)."""
    root = tmp_path / "data"
    root.mkdir()
    with pq.ParquetWriter(root / "a-default.parquet", pa.schema({"image": pa.binary()})) as writer:
        writer.write_table(pa.table({"image": cells(1, 1, 60, 1)}))
        writer.write_table(pa.table({"image": cells(1, 5, 1, 1, seed=1)}))
    paged = {"use_dictionary": False, "write_batch_size": 1, "data_page_size": 1}  # a page a cell
    pq.write_table(pa.table({"image": cells(1, 1, 1, 80, 1, 1, 1, 1, seed=2)}), root / "b-paged-v1.parquet",
                   row_group_size=6, **paged)
    hub = [{"bytes": c, "path": f"{k}.jpg"} for k, c in enumerate(cells(1, 80, 1, seed=3))]
    pq.write_table(pa.table({"image": hub}), root / "c-paged-v2.parquet", data_page_version="2.0",
                   compression="zstd", **paged)

    growth, rows = read_in_a_fresh_process(root, 4)

    def outcome(name: str, row: int):
        size, error = rows[f"{name}.parquet/{row}"]
        return size if not error else error.replace(f"{root}/{name}.parquet row {row}: ", "")

    assert [outcome("a-default", r) for r in range(4)] == 4 * [
        "too large: its row group's 4 cells are one 63.0 MB dictionary page, more than the 4 x data.max_file_mb=4 MB "
        "a page may take; write smaller row groups"]
    assert [outcome("a-default", r) for r in range(4, 8)] == [MB, "too large: more than data.max_file_mb=4 MB", MB, MB]
    assert [outcome("b-paged-v1", r) for r in range(8)] == [
        MB, MB, MB, "too large: its cell is 80.0 MB, more than data.max_file_mb=4 MB",
        "too large: reading it means decoding row 3's 80.0 MB page first, more than data.max_file_mb=4 MB",
        "too large: reading it means decoding row 3's 80.0 MB page first, more than data.max_file_mb=4 MB",
        MB, MB]  # the last two: the next row group
    assert [outcome("c-paged-v2", r) for r in range(3)] == [
        MB, "too large: its cell is 80.0 MB, more than data.max_file_mb=4 MB",
        "too large: reading it means decoding row 1's 80.0 MB page first, more than data.max_file_mb=4 MB"]
    assert growth < 60, f"{growth:.0f} MB to read 13 cells of 1 MB"


def test_a_parquet_page_header_that_is_not_one_is_a_read_failure(tmp_path):
    """The page headers are read from untrusted bytes: garbage where one should be fails the
    rows that need it, with the file named, and the rows before it are read."""
    from blipinpaint.source_reads import _page_header

    root = tmp_path / "data"
    root.mkdir()
    pq.write_table(pa.table({"image": cells(*[0.01] * 6)}), root / "x.parquet", row_group_size=3,
                   use_dictionary=False, write_batch_size=1)
    second = pq.ParquetFile(root / "x.parquet").metadata.row_group(1).column(0).data_page_offset
    data = bytearray((root / "x.parquet").read_bytes())
    header = bytes(data[second:second + 64])
    data[second:second + 8] = b"\xff" * 8
    (root / "x.parquet").write_bytes(bytes(data))
    batch = read_files(items_to_batch(list_inputs(str(root))), max_mb=0.015)  # row groups of 30 kB: looked into
    assert [len(b) for b in batch["bytes"][:3]] == [int(0.01 * MB)] * 3 and list(batch["error"][:3]) == [""] * 3
    assert all(e.startswith(f"read failed: {root}/x.parquet: ") for e in batch["error"][3:])
    # Any change to a real header ends in a header, ValueError or EOFError (more bytes wanted): nothing else.
    rng = np.random.default_rng(0)
    for _ in range(3000):
        mutated = bytearray(header)
        for at in rng.integers(0, len(header), size=rng.integers(1, 4)):
            mutated[at] = rng.integers(0, 256)
        try:
            _page_header(bytes(mutated[:rng.integers(1, len(header) + 1)]))
        except (ValueError, EOFError):
            pass


def test_a_parquet_cell_of_exactly_the_limit_is_read(tmp_path):
    """The limit is on the cell, as on a file: one of max_file_mb bytes is read; one byte more
    is read and refused (its page's own bytes are within the page's allowance); a cell 10% over
    is refused from its page header, unread."""
    root = tmp_path / "data"
    root.mkdir()
    limit = 100_000
    sizes = [limit, limit + 1, int(limit * 1.1)]
    pq.write_table(pa.table({"image": [bytes(n) for n in sizes]}), root / "x.parquet", use_dictionary=False,
                   write_batch_size=1, data_page_size=1, compression="none")  # a page a cell
    batch = read_files(items_to_batch(list_inputs(str(root))), max_mb=limit / MB)
    assert [len(b) for b in batch["bytes"]] == [limit, 0, 0]
    assert batch["error"][0] == "" and batch["error"][1] == f"too large: more than data.max_file_mb={limit / MB:g} MB"
    assert batch["error"][2] == (f"too large: {root}/x.parquet row 2: its cell is 0.1 MB, "
                                 f"more than data.max_file_mb={limit / MB:g} MB")
