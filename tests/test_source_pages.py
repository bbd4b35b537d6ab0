"""Listing in pages (`blipinpaint.source_pages`) and the dry run that reads them: the same
inputs as a whole listing, a few shards at a time."""

import json

import pytest
from helpers import encode, photo, write_shard

from blipinpaint import plan, source_pages, sources
from blipinpaint.commit_log import CommitLog
from blipinpaint.config import load_config
from blipinpaint.records import encode_rows
from blipinpaint.source_pages import iter_inputs, shard_groups
from blipinpaint.sources import list_inputs

JPEG = encode(photo(32, 24, seed=1), "JPEG")


@pytest.fixture
def shards(tmp_path):
    """Four shards of five samples each (one key with no image), and one cut short."""
    root = tmp_path / "shards"
    root.mkdir()
    for s in range(4):
        write_shard(root / f"{s:05d}.tar", [(f"{k:03d}.jpg", JPEG) for k in range(5)] + [("009.txt", b"a caption")])
    write_shard(root / "00004.tar", [("000.jpg", JPEG), ("001.jpg", JPEG)], cut=512 + 512 + 100)
    return root


def flat(pages):
    return [it for page in pages for it in page]


def test_pages_hold_the_same_inputs_as_a_whole_listing_a_shard_at_a_time(shards):
    pages = list(iter_inputs(str(shards)))
    assert len(pages) == 5 and all(len(p) <= 6 for p in pages)  # one shard group each
    assert flat(pages) == list_inputs(str(shards))  # ids, error rows, byte ranges, in id order
    assert [p[0]["id"] for p in pages] == ["00000.tar/000", "00001.tar/000", "00002.tar/000", "00003.tar/000",
                                           "00004.tar"]
    assert plan.inputs_digest(flat(pages)) == plan.inputs_digest(list_inputs(str(shards)))


def test_a_shard_listed_twice_is_one_group_whose_repeats_are_error_rows(shards):
    source = f"{shards}/{{00001,00000,00001}}.tar"
    pages = list(iter_inputs(source))
    assert [len(p) for p in pages] == [6, 12]  # 00000, then both 00001s together
    whole = list_inputs(source)
    assert flat(pages) == whole
    repeats = [it for it in whole if it["id"].endswith("#2")]
    assert len(repeats) == 6 and all(it["error"].startswith("duplicate id:") for it in repeats)
    # A shard below another's path (possible in a bucket) may meet its ids: the same group.
    groups = shard_groups(f"{shards}/{{x.tar,x.tar/y.tar,z.tar}}")
    assert [[shard_id for _, shard_id in g] for g in groups] == [["x.tar", "x.tar/y.tar"], ["z.tar"]]


def test_the_limit_keeps_the_same_seeded_subset_in_bounded_memory(shards):
    for seed in (0, 7):
        whole = [it["id"] for it in list_inputs(str(shards), limit=7, seed=seed)]
        [page] = iter_inputs(str(shards), limit=7, seed=seed)
        assert [it["id"] for it in page] == whole and len(whole) == 7
    assert flat(iter_inputs(str(shards), limit=100)) == list_inputs(str(shards))
    assert flat(iter_inputs(str(shards), limit=0)) == []


def test_a_source_that_cannot_be_listed_fails_before_the_first_page(tmp_path):
    with pytest.raises(sources.SourceError, match="does not exist"):
        iter_inputs(str(tmp_path / "missing"), kind="webdataset")


def test_the_dry_run_plans_a_sharded_source_page_by_page(shards, tmp_path, monkeypatch):
    """Part of the inputs committed (error rows through the writer): the plan counts what is
    committed and left, never listing the source whole (`list_inputs`/`list_webdataset` refuse)."""
    run_dir = tmp_path / "run"
    log = CommitLog(str(run_dir / "generate"))
    done = ["00000.tar/000", "00000.tar/001", "00003.tar/004", "gone/elsewhere"]  # one not listed now
    log.commit(encode_rows({"id": done, "source": done, "error": ["not an image: test"] * 4,
                            "seconds_prepare": [0.5] * 4}, models={}))
    whole = list_inputs(str(shards))

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run listed the source whole")

    monkeypatch.setattr(sources, "list_webdataset", refuse)
    monkeypatch.setattr(source_pages, "list_inputs", refuse)
    seen = []
    real = source_pages.list_group
    monkeypatch.setattr(source_pages, "list_group", lambda *a: seen.append(a[0]) or real(*a))
    from rayjobs import generate

    cfg = load_config(overrides=[f"run_dir={run_dir}", f"data.source={shards}", "dry_run=true",
                                 "stream.rows_per_file=4"])
    result = generate.run(cfg)
    assert len(seen) == 5  # a page per shard
    assert (result["inputs"], result["committed"], result["to_do"]) == (len(whole), 3, len(whole) - 3)
    assert result["committed_errors"] == 3 and result["parts_to_write"] == -(-(len(whole) - 3) // 4)
    assert result["made_by"]["inputs_digest"] == plan.inputs_digest(whole)
    assert result["estimate"]["stages"]["prepare"]["s_per_row"] == 0.5
    assert json.loads((run_dir / "plan.json").read_text())["to_do"] == len(whole) - 3


def test_plain_shards_read_without_tarfile_list_the_same_members(tmp_path, monkeypatch):
    """`tar_headers.plain_members` against tarfile on shards of each kind: the same items; it
    reads the plain ones (ustar and GNU headers, long names in the ustar prefix, carried
    members, names that are not UTF-8) and hands the rest to tarfile (a pax header, a shard
    cut short, one without its end blocks)."""
    import io
    import tarfile

    def shard(path, members, fmt=tarfile.USTAR_FORMAT, cut=None):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            tar.addfile(_folder())
        data = buf.getvalue()
        path.write_bytes(data if cut is None else data[:cut])
        return str(path)

    def _folder():
        info = tarfile.TarInfo("sub")
        info.type = tarfile.DIRTYPE
        return info

    members = [("000.jpg", JPEG), ("000.txt", b"a caption \xff"), ("000.json", b'{"w": 1}'), ("001.png", JPEG),
               ("002.txt", b"no image"), ("caf\udce9.jpg", JPEG), ("d" * 90 + "/" + "e" * 90 + ".jpg", JPEG)]
    cases = {"ustar": (shard(tmp_path / "u.tar", members), True),
             "gnu": (shard(tmp_path / "g.tar", members[:5], tarfile.GNU_FORMAT), True),
             "pax": (shard(tmp_path / "p.tar", members + [("x" * 300 + ".jpg", JPEG)], tarfile.PAX_FORMAT), False),
             "cut": (shard(tmp_path / "c.tar", members, cut=512 * 5 + 100), False),
             "no end": (shard(tmp_path / "n.tar", members[:2], cut=512 * 5), False)}
    from blipinpaint import tar_headers

    real, read = tar_headers.plain_members, []
    monkeypatch.setattr(sources, "plain_members", lambda *a: read.append(real(*a)) or read[-1])
    for what, (path, plain) in cases.items():
        read.clear()
        fast = sources.scan_shard(path, "s.tar")
        assert (read[0] is not None) == plain, what
        with monkeypatch.context() as m:
            m.setattr(sources, "plain_members", lambda *a: None)
            assert fast == sources.scan_shard(path, "s.tar"), what
    items = {it["id"]: it for it in sources.scan_shard(cases["ustar"][0], "s.tar")}
    assert json.loads(items["s.tar/000"]["annotations"]) == {"txt": "a caption \ufffd", "json": '{"w": 1}'}
    assert "s.tar/" + "d" * 90 + "/" + "e" * 90 in items and "s.tar/caf\\xe9" in items


def test_a_page_is_checked_against_the_committed_ids_in_its_own_span_only(monkeypatch):
    """`plan.SortedIds`: the log's ids sorted once, a page looked up among those between its
    smallest and largest id. `pc.is_in` hashes its whole value set each call (1.5-2.8 s for
    10^7 ids here), so one call per page against the whole log cost about an hour at 10^7.
    The answers are those of a lookup in the whole set, for pages inside, across and outside
    the committed ids, unicode, repeated and absent ids."""
    import random

    import pyarrow as pa
    import pyarrow.compute as pc

    committed = [f"{s:03d}.tar/{k:04d}.jpg" for s in range(100) for k in range(0, 100, 2)] + ["ü.tar/é", "z.tar/0"]
    random.Random(0).shuffle(committed)
    done = pa.chunked_array([committed[:3000], committed[3000:]], pa.string())
    pages = [[f"017.tar/{k:04d}.jpg" for k in range(100)],  # one shard: half committed
             [f"{s:03d}.tar/0004.jpg" for s in range(95, 100)] + ["ü.tar/é", "ü.tar/x"],
             ["000.tar/0000.jpg", "000.tar/0000.jpg", "0.tar/x", "zz.tar/y"], []]
    sizes, real_is_in = [], pc.is_in

    def is_in(values, value_set):
        sizes.append(len(value_set))
        return real_is_in(values, value_set=value_set)

    monkeypatch.setattr(pc, "is_in", is_in)
    index = plan.SortedIds(done)
    for page in pages:
        ids = pa.array(page, pa.string())
        assert index.held(ids).to_pylist() == [i in set(committed) for i in page]
        assert plan.committed_filter(done)(page) == [i for i in page if i in set(committed)]
    # A page of one shard is looked up among that shard's 50 committed ids, one of a few shards
    # among their 250 (the whole log: 5,002); a page spanning the log (the third) among all.
    assert sizes[:4] == [50, 50, 250, 250]
    listed = plan.read_pages(done, [[{"id": i} for i in page] for page in pages], keep_absent=True)
    assert sorted(listed.hits.to_pylist()) == sorted(i for page in pages for i in page if i in set(committed))


def test_a_sorted_index_of_the_log_s_ids_serves_both_readers_unsorted_again(monkeypatch):
    """`SortedIds.of`: the driver's look for something left (`generate.listed_if_done`) checks
    each page with `committed_filter` and keeps it with `read_pages`, both from one sorted
    copy of the log's ids (sorting 10^7 ids takes about 1.7 s here; each sorted its own).
    The run's test: `test_a_resumed_stream_skips_the_committed_ids_in_its_read_tasks`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    sorts, real_sort = [], pc.sort_indices
    monkeypatch.setattr(pc, "sort_indices", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    index = plan.SortedIds(pa.array(["b", "a", "c"], pa.string()))
    assert plan.SortedIds.of(index) is index and len(sorts) == 1
    assert plan.committed_filter(index)(["a", "x", "c"]) == ["a", "c"]
    listed = plan.read_pages(index, [[{"id": "c"}, {"id": "y"}]], keep_absent=True)
    assert listed.hits.to_pylist() == ["c"] and listed.absent.to_pylist() == ["y"]
    assert len(sorts) == 1
