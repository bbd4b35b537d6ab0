"""The scripts `bench/scale.py` runs, each with `python -c` in a process of its own (so its
peak memory is that process's alone); each prints one `RESULT <json>` line.

Peak memory is `VmHWM` (`peak_kb`), not `ru_maxrss`: Linux carries the spawning process's
peak into a child's `ru_maxrss` at exec, so a script started by the bench (which imports
torch and Ray) never read below the bench's own peak, whatever it held itself."""

PEAK = """
def peak_kb():  # this process's own peak RSS (VmHWM), in kB
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1])
"""

# One run, in a process of its own: prints one JSON line.
RUN = PEAK + """
import json, sys, time
from blipinpaint.commit_log import CommitLog
from blipinpaint.config import load_config
from blipinpaint.sources import list_inputs
from rayjobs import generate

cfg = load_config(overrides=sys.argv[1:])
t0 = time.perf_counter()
items = list_inputs(cfg.data.source, cfg.data.kind)
list_s = time.perf_counter() - t0
rss_listed = peak_kb()
del items
t0, started = time.perf_counter(), time.time()
stats = generate.run(cfg)
wall = time.perf_counter() - t0
assert stats["ok"] + stats["errors"] == stats["inputs"] and not stats["missing"], stats
commits = sorted(m["committed_at"] - started for m in CommitLog(cfg.run_dir.rstrip("/") + "/generate").markers())
print("RESULT " + json.dumps({"wall_s": wall, "list_s": list_s, "pipeline_s": stats["this_run"]["pipeline_s"],
                  "commits_s": [commits[0], commits[len(commits) // 2], commits[-1]] if commits else None,
                  "processed": stats["this_run"]["processed"], "inputs": stats["inputs"],
                  "rss_after_listing_mb": rss_listed / 1024,
                  "peak_rss_mb": peak_kb() / 1024}))
"""


# The commit log's read, in a process of its own: `markers` parts of `rows` error rows each
# committed through the writer (no compaction while committing), then read by a new reader
# before and after one compaction, and a resume after it. Prints one JSON line.
LOG = PEAK + """
import json, sys, time
from pyarrow import fs as pafs
from blipinpaint.commit_log import CommitLog
from blipinpaint.records import encode_rows
from blipinpaint.storage import filesystem

uri, markers, rows, build = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
log, t0 = CommitLog(build, compact_every=0), time.perf_counter()
for k in range(markers):
    ids = [f"{k:08d}.tar/{j:05d}.jpg" for j in range(rows)]
    log.commit(encode_rows({"id": ids, "source": ids, "error": ["not an image: bench"] * rows,
                            "seconds_prepare": [0.01] * rows}, models={}))
build_s = time.perf_counter() - t0

def timed(what):
    t0 = time.perf_counter()
    out = what()
    return out, time.perf_counter() - t0

out = {}
if build == uri:  # the log of markers read here, then compacted here
    ids, out["read_uncompacted_s"] = timed(lambda: CommitLog(uri).committed_ids())
    out["ms_per_marker_uncompacted"] = 1000 * out["read_uncompacted_s"] / markers
    done, out["compact_s"] = timed(lambda: CommitLog(uri).compact())
else:  # built and compacted on the disk (40,000 commits on the endpoint take hours), then copied there
    done, out["compact_s"] = timed(lambda: CommitLog(build).compact())
    (src, src_root), (dst, dst_root) = filesystem(build), filesystem(uri)
    _, out["copy_s"] = timed(lambda: pafs.copy_files(src_root, dst_root, source_filesystem=src,
                                                     destination_filesystem=dst, use_threads=True))
    ids = None
rss0 = peak_kb()
array, out["read_ids_array_s"] = timed(lambda: CommitLog(uri).committed_id_array())
resumed, out["resume_compacted_s"] = timed(lambda: CommitLog(uri).resume(grace_s=0))
assert len(array) == len(resumed.done_ids) == markers * rows
again, out["read_compacted_set_s"] = timed(lambda: CommitLog(uri).committed_ids())
assert ids is None or ids == again
print("RESULT " + json.dumps({"markers": markers, "rows_per_marker": rows, "build_s": build_s, **out,
      "checkpoint_mb": done["bytes"] / 1e6, "peak_rss_mb_before_reads": rss0 / 1024,
      "peak_rss_mb": peak_kb() / 1024}))
"""


# The listing of a WebDataset source, in a process of its own: `list_inputs`, or a dry run
# (`generate.run` with `dry_run=true`). Prints one JSON line.
LIST = PEAK + """
import json, sys, time
from blipinpaint.config import load_config
from blipinpaint.sources import list_inputs
from rayjobs import generate

mode, source, run_dir = sys.argv[1:4]
rss_imported = peak_kb()
t0 = time.perf_counter()
if mode == "list_inputs":
    inputs = len(list_inputs(source))
else:
    cfg = load_config(overrides=[f"run_dir={run_dir}", f"data.source={source}", "dry_run=true"])
    inputs = generate.run(cfg)["inputs"]
peak = peak_kb()
print("RESULT " + json.dumps({"mode": mode, "inputs": inputs, "wall_s": time.perf_counter() - t0,
      "rss_imported_mb": rss_imported / 1024, "peak_rss_mb": peak / 1024}))
"""


# One read of an existing log, in a fresh process (so its peak memory is that read's): the
# ids as an Arrow array, a whole resume, or the ids as a Python set. Prints one JSON line.
READ = PEAK + """
import json, sys, time
from blipinpaint.commit_log import CommitLog

uri, what = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if what == "array":
    n = len(CommitLog(uri).committed_id_array())
elif what == "resume":
    resumed = CommitLog(uri).resume(grace_s=0)
    n = len(resumed.done_ids) if hasattr(resumed, "done_ids") else len(resumed.done)
elif what == "resume_unflagged":  # the recovery before `placed`: every part's data files looked for
    log = CommitLog(uri)
    log.here = "elsewhere"  # a checkpoint's flags hold for the folder it was written in only
    n = len(log.resume(grace_s=0).done_ids)
else:
    n = len(CommitLog(uri).committed_ids())
print("RESULT " + json.dumps({"read": what, "ids": n, "seconds": round(time.perf_counter() - t0, 3),
      "peak_rss_mb": round(peak_kb() / 1024)}))
"""


# A real run (`generate.run`, not a dry run) started for its first committed parts: says when
# it calls `generate.run` (`CALL <json>`, with the RSS after the imports), then runs until the
# bench (`scale.first_parts`) kills it; the bench watches the log's markers from outside.
FIRST = PEAK + """
import json, sys, time
from blipinpaint.config import load_config
from rayjobs import generate

cfg = load_config(overrides=sys.argv[1:])
print("CALL " + json.dumps({"t": time.time(),
      "rss_imported_mb": peak_kb() / 1024}), flush=True)
generate.run(cfg)
print("FINISHED", flush=True)
"""


# A whole run's commit log made for a WebDataset source without the models: every listed id
# committed as an error row, in parts of `rows`, through the writer a run uses (its owner
# token, its compactions every `stream.compact_every` parts, the fingerprint `generate.run`
# claims), then compacted as a run's end does. A rerun over it has nothing to do. Prints one
# JSON line.
BUILD_DONE = PEAK + """
import json, sys, time
from blipinpaint import builders, fingerprint
from blipinpaint.commit_log import CommitLog
from blipinpaint.config import load_config
from blipinpaint.layout import RunLayout
from blipinpaint.records import encode_rows
from blipinpaint.source_pages import iter_inputs

rows, cfg = int(sys.argv[1]), load_config(overrides=sys.argv[2:])
t0 = time.perf_counter()
builders.fill_store(cfg)
out_dir = RunLayout(cfg.run_dir).generate
fingerprint.claim(cfg, "generate", (out_dir,), fingerprint.generate(cfg))
log = CommitLog(out_dir, compact_every=cfg.stream.compact_every)
log.take_over(grace_s=0)
ids, parts = [], 0

def commit(ids):
    log.commit(encode_rows({"id": ids, "source": ids, "error": ["not an image: bench"] * len(ids),
                            "seconds_prepare": [0.01] * len(ids)}, models={}))

for page in iter_inputs(cfg.data.source, "webdataset"):
    ids += [it["id"] for it in page]
    while len(ids) >= rows:
        commit(ids[:rows])
        ids, parts = ids[rows:], parts + 1
if ids:
    commit(ids)
    parts += 1
log.compact()
log.release()
print("RESULT " + json.dumps({"parts": parts, "build_s": time.perf_counter() - t0,
      "peak_rss_mb": peak_kb() / 1024}))
"""


# `generate.run` again over a run whose every input is committed (`BUILD_DONE`): nothing to
# do, so no Ray and no model pool; the driver lists the source to learn that and to account
# for every input. Prints one JSON line.
NOOP = PEAK + """
import json, sys, time
from blipinpaint.config import load_config
from rayjobs import generate

cfg = load_config(overrides=sys.argv[1:])
rss_imported = peak_kb()
t0 = time.perf_counter()
stats = generate.run(cfg)
wall = time.perf_counter() - t0
assert stats["this_run"]["processed"] == 0 and stats["inputs"] == stats["errors"] and not stats["missing"], stats
print("RESULT " + json.dumps({"inputs": stats["inputs"], "wall_s": wall, "rss_imported_mb": rss_imported / 1024,
      "peak_rss_mb": peak_kb() / 1024}))
"""


# A run folder (`BUILD_DONE`'s, on the disk) copied into a bucket of the S3 endpoint, then its
# generate log compacted there once: a checkpoint's `placed` flags hold for the folder its
# compaction listed, not for a copy. Building at 10^7 through the writer on moto would take
# about 100 minutes (150 ms a commit). Prints one JSON line.
COPY_RUN = """
import json, sys, time
from pyarrow import fs as pafs
from blipinpaint.commit_log import CommitLog
from blipinpaint.layout import RunLayout
from blipinpaint.storage import filesystem

t0 = time.perf_counter()
src, src_root = filesystem(sys.argv[1])
dst, dst_root = filesystem(sys.argv[2])
pafs.copy_files(src_root, dst_root, source_filesystem=src, destination_filesystem=dst, use_threads=True)
CommitLog(RunLayout(sys.argv[2]).generate).compact()
print("RESULT " + json.dumps({"copy_s": time.perf_counter() - t0}))
"""
