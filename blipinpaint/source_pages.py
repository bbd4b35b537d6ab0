"""Listing in pages: a run's inputs a few shards at a time, so a reader never holds them all.

`iter_inputs` yields the same inputs as `sources.list_inputs` (same ids, same error rows, the
same seeded `data.limit` subset) as a stream of pages, each sorted by id. For a WebDataset
source a page is one *shard group* (`shard_groups`): usually one shard, listed when the
reader gets to it (a few shards ahead, in threads), so memory holds a few shards' items, not
one dict per input of the whole source. The other kinds are one page (`list_inputs`): a
folder, COCO or VisualGenome annotations and a manifest are listed from one file or one
walk anyway, and Parquet ids taken from `data.id_column` may repeat across any two files.

Why a shard group is enough for exactly-once ids: a WebDataset id is `<shard>/<key>` (or
`<shard>` for a shard that cannot be read to its end), so two shards' ids can only meet
when one shard is listed twice (a brace pattern may repeat a file) or one shard's path lies
below the other's as if it were a folder (`a.tar` and `a.tar/b.tar`, possible in a bucket).
Such shards form one group, listed together through `_unique` in sorted shard order: the
repeated id becomes the same suffixed error row it is in a whole listing, and a suffixed id
(`<id>#2`) has the same shard prefix, so it cannot meet an id outside its group either.

With `data.limit` the subset is the `limit` inputs first in the seeded hash order
(`sample_seed(seed, id, "subset")`), kept in a heap while the pages stream past: memory holds
`limit` items, and the subset is one page at the end.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from blipinpaint.seeds import sample_seed
from blipinpaint.sources import SourceError, _relative, _unique, detect_kind, expand, list_inputs, scan_shard

AHEAD = 4  # shard groups listed ahead of the reader (and threads): bounds the pages in memory


def shard_groups(source: str) -> list[list[tuple[str, str]]]:
    """The shards of a WebDataset source as groups of (shard, shard id), in sorted order: shards
    whose ids may meet (the same shard twice, or one below another's path) share a group."""
    root, shards = expand(source, ".tar")
    named = [(shard, _relative(root, shard)) for shard in shards]
    parent = list(range(len(named)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, (_, shard_id) in enumerate(named):
        if shard_id in first:
            parent[find(i)] = find(first[shard_id])
        else:
            first[shard_id] = i
    for i, (_, shard_id) in enumerate(named):
        parts = shard_id.split("/")
        for k in range(1, len(parts)):  # a shard at a folder above this one's path
            above = first.get("/".join(parts[:k]))
            if above is not None:
                parent[find(i)] = find(above)
    groups: dict[int, list[tuple[str, str]]] = {}
    for i, pair in enumerate(named):
        groups.setdefault(find(i), []).append(pair)
    return list(groups.values())  # in the order of each group's first shard


def list_group(group: list[tuple[str, str]], source: str) -> list[dict]:
    """The inputs of one shard group, sorted by id, repeated ids as error rows (`_unique`)."""
    items = [it for shard, shard_id in group for it in scan_shard(shard, shard_id)]
    return sorted(_unique(items, source), key=lambda it: it["id"])


def iter_webdataset(source: str) -> Iterator[list[dict]]:
    """One page per shard group, listed `AHEAD` groups ahead of the reader in threads."""
    groups = shard_groups(source)
    with ThreadPoolExecutor(AHEAD) as pool:
        pending = [pool.submit(list_group, g, source) for g in groups[:AHEAD]]
        for k in range(len(groups)):
            page = pending[k].result()
            pending[k] = None  # the page goes to the reader only
            if k + AHEAD < len(groups):
                pending.append(pool.submit(list_group, groups[k + AHEAD], source))
            yield page


def iter_inputs(source: str, kind: str = "auto", image_root: str | None = None, limit: int | None = None,
                seed: int = 0, image_column: str = "image", id_column: str | None = None) -> Iterator[list[dict]]:
    """The inputs of `list_inputs`, in pages each sorted by id (see the module's docstring).
    A source that cannot be listed raises `SourceError` before the first page."""
    kind = detect_kind(source) if kind == "auto" else kind
    if kind != "webdataset":
        return iter([list_inputs(source, kind, image_root, limit, seed, image_column, id_column)])
    pages = iter_webdataset(source)
    first = next(pages, None)  # a bad source fails here, not in the reader's loop
    if first is None:
        raise SourceError(f"data.source {source!r} holds no .tar files")
    pages = itertools.chain([first], pages)
    return pages if limit is None else iter([subset(pages, limit, seed)])


def subset(pages, limit: int, seed: int) -> list[dict]:
    """The `limit` inputs first in the seeded hash order (`list_inputs`' subset), sorted by id;
    a heap of `limit` items while the pages stream past."""
    if limit <= 0:
        return []
    heap: list[tuple[int, str, dict]] = []  # (-hash, id, item): the root is the last one kept
    for page in pages:
        for it in page:
            entry = (-sample_seed(seed, it["id"], "subset"), it["id"], it)
            if len(heap) < limit:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:
                heapq.heapreplace(heap, entry)
    return sorted((it for _, _, it in heap), key=lambda it: it["id"])
