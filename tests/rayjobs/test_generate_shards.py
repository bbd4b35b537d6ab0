"""The generate job on WebDataset shards: the listing streams (read tasks list each shard group
and skip the committed ids), the driver holds shard groups, never one item per image."""

import re
import threading
import time

import pytest
from helpers import encode, photo, write_shard
from ray.data._internal.execution.resource_manager import ResourceManager

from blipinpaint import plan, source_pages, sources
from blipinpaint.commit_log import CommitLog
from blipinpaint.config import load_config
from rayjobs import generate


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of two photographs; the pattern names the middle one twice, so its two
    ids repeat across shards."""
    root = tmp_path_factory.mktemp("shards")
    for s in range(3):
        write_shard(root / f"{s:05d}.tar", [(f"{k}.jpg", encode(photo(48, 48, seed=10 * s + k), "JPEG"))
                                            for k in range(2)])
    return f"{root}/{{00000,00001,00002,00001}}.tar"


def _cfg(run_dir, source, *extra):
    return load_config(overrides=[f"run_dir={run_dir}", f"data.source={source}", "stream.rows_per_file=3",
                                  "stream.read.batch_size=3", *extra])


# How long the watched run's last read may be held waiting for a part to be committed (a
# bound on a failure only: the hold ends as soon as a part is there).
COMMIT_WAIT_S = 180


def release_after_a_part(run_dir, hold, seen: list) -> threading.Thread:
    """Creates `hold` (letting the held read task go on) once the stream has committed a part of
    samples, or after `COMMIT_WAIT_S`; `seen` gets whether a part was there by then."""
    def watch():
        samples, deadline = run_dir / "generate" / "samples", time.monotonic() + COMMIT_WAIT_S
        while not any(samples.glob("*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append(any(samples.glob("*.parquet")))
        hold.touch()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def streamed(local_ray, shards, tmp_path_factory):
    """A run whose driver is watched: when it lists a shard group, whether the stream has ended.
    The read task of the last shard's second image is held until a part has been committed
    (`release_after_a_part`), as a long listing keeps read tasks coming at 10^6 inputs."""
    run_dir = tmp_path_factory.mktemp("gen-shards")
    calls, ended, committed, limits = [], [], [], []
    hold = run_dir / "hold"
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise AssertionError("the driver listed the source whole")

    real_group, real_stream = source_pages.list_group, generate.run_stream
    mp.setattr(sources, "list_webdataset", refuse)
    mp.setattr(source_pages, "list_inputs", refuse)
    def counted(*args):
        calls.append(bool(ended))
        return real_group(*args)

    mp.setattr(source_pages, "list_group", counted)
    mp.setattr(generate, "list_group", counted)  # the driver's look for something left (`listed_if_done`)
    mp.setattr(generate, "run_stream", lambda *a: (real_stream(*a), ended.append(1))[0])  # set once it ends
    real_limits = ResourceManager.get_global_limits

    def recorded(self):  # Ray Data's CPU limit for the stream, each time its executor asks (in the driver)
        found = real_limits(self)
        limits.append(found.cpu)
        return found

    mp.setattr(ResourceManager, "get_global_limits", recorded)
    watcher = release_after_a_part(run_dir, hold, committed)
    try:
        stats = generate.run(_cfg(run_dir, shards, "stream.inject_failure.stage=prepare",
                                  "stream.inject_failure.id=00002.tar/1", f"stream.inject_failure.hold={hold}"))
    finally:
        mp.undo()
        hold.touch()
        watcher.join()
    return run_dir, stats, calls, ended, committed, limits


def test_the_stream_lists_the_shards_and_the_driver_only_accounts(streamed):
    run_dir, stats, calls, ended, _, _ = streamed
    assert ended == [1]
    # The driver listed one group before the stream (to learn that something is left), the
    # rest only for the accounting, after it: the read tasks listed them for the stream.
    assert calls == [False] + [True] * 3
    assert (stats["inputs"], stats["ok"], stats["missing"], stats["duplicates"]) == (8, 6, 0, 0)
    # The repeated shard's ids: error rows of their own, never dropped (as a whole listing makes them).
    assert stats["errors_by_reason"] == {"duplicate id": 2}
    assert stats["this_run"]["processed"] == 8 and (run_dir / "generate" / "_SUCCESS").exists()
    log = CommitLog(str(run_dir / "generate"))
    assert log.committed_ids() == {f"{s:05d}.tar/{k}" for s in range(3) for k in range(2)} | {
        "00001.tar/0#2", "00001.tar/1#2"}


def test_each_read_task_lists_one_shard_group_and_hands_on_blocks_of_a_read_batch(streamed):
    """A task per shard group, its rows cut into blocks of `stream.read.batch_size` (3 here; the
    repeated shard's group holds 4 rows) in that task. Without it Ray Data fused the listing
    with `prepare` into tasks of `read.batch_size` groups, each a block of all their rows, and
    at 10^6 inputs no part was committed in 13 minutes (BENCHMARKS.md)."""
    run_dir, _, _, _, _, _ = streamed
    text = (run_dir / "generate" / "ray_stats.txt").read_text()
    stage = re.search(r"Operator \d+ MapBatches\(list_pending\)->StreamingRepartition\[num_rows_per_block=3\S*\]: "
                      r"(\d+) tasks executed.*?Output num rows per block: \d+ min, (\d+) max", text, re.S)
    assert stage is not None, text[:3000]
    assert (int(stage.group(1)), int(stage.group(2))) == (3, 3)
    # The reads are tasks of their own, never fused into the captioner's actors (a crash in a
    # decoder would take a model actor down), whatever CPU share the two are given.
    assert re.search(r"Operator \d+ MapBatches\(counted_task\): ", text) and "counted_task)->" not in text, text[:3000]


def test_parts_are_committed_while_a_read_task_holds_its_cpu(streamed):
    """The commit tasks have a CPU share of their own (`stream.commit.num_cpus`, left free by the
    pools' sizing): with the pools holding the rest, a read task that does not end (held here;
    at 10^6 inputs, the reads keep coming) no longer keeps every part from being committed.
    Sharing the read tasks' share, the commits of a real run at 10^6 waited 21-28 s each."""
    run_dir, stats, _, _, committed, _ = streamed
    assert committed == [True]
    assert (run_dir / "hold.reached").exists()  # the read was held
    assert stats["ok"] == 6


def test_the_stream_may_use_every_cpu_of_the_cluster(streamed, local_ray):
    """Ray Data's limit for the stream is the cluster's CPUs (`cluster.DATA_AUTOSCALER`), once it
    has one: with Ray 2.60's default autoscaler it was what the stages asked for plus the whole
    CPUs left, a fraction of a core short with the pools at fractional CPUs (1.25-1.75 of 2),
    and the commits, last in line, waited until an earlier stage ended."""
    limits = streamed[-1]
    assert {cpu for cpu in limits if cpu > 0} == {local_ray.cluster_resources()["CPU"]}, limits  # 0: none asked yet


def test_a_resumed_stream_skips_the_committed_ids_in_its_read_tasks(streamed, shards, tmp_path):
    import shutil

    run_dir, _, _, _, _, _ = streamed
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "generate", copy / "generate")
    (copy / "generate" / "_SUCCESS").unlink()
    log = CommitLog(str(copy / "generate"))
    undone = log.uncommit(lambda m: m["name"] == log.markers()[0]["name"])
    stats = generate.run(_cfg(copy, shards))
    assert (stats["this_run"]["processed"], stats["this_run"]["skipped_committed"]) == (len(undone), 8 - len(undone))
    assert (stats["inputs"], stats["ok"] + stats["errors"], stats["missing"], stats["duplicates"]) == (8, 8, 0, 0)
    listings, sorts = [], []
    with pytest.MonkeyPatch.context() as mp:
        real = source_pages.list_group
        for module in (source_pages, generate):
            mp.setattr(module, "list_group", lambda *a: (listings.append(a[0]), real(*a))[1])
        real_sorted = plan.SortedIds.__init__
        mp.setattr(plan.SortedIds, "__init__", lambda self, ids: (sorts.append(len(ids)), real_sorted(self, ids))[1])
        again = generate.run(_cfg(copy, shards))
    # Listed in the driver, nothing left: no stream, so no model pool (no GPU node brought up for
    # nothing); and listed once, each of the 3 shard groups, its pages also what is accounted,
    # checked against the log's ids sorted once (1.7 s at 10^7 ids).
    assert again["this_run"]["processed"] == 0 and again["this_run"]["pipeline_s"] == 0
    assert len(listings) == 3 and sorts == [8]
    assert (again["inputs"], again["ok"] + again["errors"], again["missing"]) == (8, 8, 0)


def test_a_limit_plans_the_seeded_subset_of_the_whole_source(shards, tmp_path):
    """`data.limit`: the same subset as a whole listing's, chosen before the stream (a real run
    streams these `limit` items from the driver)."""
    from blipinpaint.plan import inputs_digest

    plan = generate.run(_cfg(tmp_path / "run", shards, "data.limit=3", "seed=5", "dry_run=true"))
    assert (plan["inputs"], plan["to_do"]) == (3, 3)
    assert plan["made_by"]["inputs_digest"] == inputs_digest(sources.list_inputs(shards, limit=3, seed=5))
