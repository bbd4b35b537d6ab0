import io
import re
import time

from helpers import sample_rows

from blipinpaint.commit_log import CommitLog
from rayjobs.progress import CommitProgress, TrainProgress, clock

LINE = re.compile(r"generate: (\d+) of 10 rows committed \((\d+) errors\), ([\d.]+) rows/s, ETA (\d+:\d\d:\d\d)$")


def _wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.01)


def test_clock():
    assert [clock(s) for s in (0, 59.6, 3599, 3600 * 27 + 61)] == ["0:00:00", "0:01:00", "0:59:59", "27:01:01"]


def test_a_line_per_interval_with_new_rows_and_a_last_line_that_counts_every_row(tmp_path):
    out = str(tmp_path / "generate")
    CommitLog(out).commit(sample_rows(["a", "b"], ["", "unreadable: x"]))  # an earlier run's part
    stream = io.StringIO()
    progress = CommitProgress("generate", out, total=10, done=2, every_s=0.05, stream=stream, terminal=False)
    looks = []
    markers = progress.log.markers
    progress.log.markers = lambda *a, **k: looks.append(1) or markers(*a, **k)
    with progress:
        for n, ids in enumerate((["c", "d", "e"], ["f", "g", "h", "i"], ["j"]), start=1):
            CommitLog(out).commit(sample_rows(ids, ["too small: 3x3"] + [""] * (len(ids) - 1)))
            _wait_for(lambda n=n: len(stream.getvalue().splitlines()) == n, f"line {n}")
        seen = len(looks)
        _wait_for(lambda: len(looks) >= seen + 3, "three looks that find nothing new")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4, lines  # nothing printed by the looks that found nothing new
    found = [LINE.match(line) for line in lines[:3]]
    assert all(found), lines
    assert [(int(m[1]), int(m[2])) for m in found] == [(5, 2), (9, 3), (10, 4)]  # the earlier run's error counts
    assert float(found[0][3]) > 0 and found[2][4] == "0:00:00"
    last = re.fullmatch(r"generate: 10 of 10 rows committed \(4 errors\), ([\d.]+) rows/s, in (\d+:\d\d:\d\d)",
                        lines[3])
    assert last, lines[3]


def test_on_a_terminal_a_bar_instead_of_lines(tmp_path):
    out = str(tmp_path / "generate")
    stream = io.StringIO()
    with CommitProgress("generate", out, total=3, done=0, every_s=30, stream=stream, terminal=True):
        CommitLog(out).commit(sample_rows(["a", "b", "c"], [""] * 3))
    drawn = stream.getvalue()
    assert "\r" in drawn and "3/3" in drawn.split("\r")[-1] and "rows committed" not in drawn


def test_training_says_each_epoch_and_long_epochs_step_by_step():
    stream = io.StringIO()
    progress = TrainProgress("finetune_blip", epochs=3, start=1, every_s=0, steps_per_epoch=2, stream=stream)
    for epoch in (1, 2):  # epoch 0 was done by an earlier run
        for step in (1, 2):
            progress.step(epoch, step, loss=float(step))
        progress.epoch(epoch, {"loss": 1.5, "probe captions changed": 2, "held-out loss": None})
    lines = stream.getvalue().splitlines()
    step = r"finetune_blip: epoch {} of 3, step {} of 2, loss {} \(mean of 1 steps\), ETA \d+:\d\d:\d\d"
    assert [bool(re.fullmatch(step.format(e, s, s), line)) for line, (e, s) in zip(
        [lines[0], lines[1], lines[3], lines[4]], [(2, 1), (2, 2), (3, 1), (3, 2)])] == [True] * 4, lines
    assert re.fullmatch(r"finetune_blip: epoch 2 of 3 done, loss 1.5, probe captions changed 2, ETA \d+:\d\d:\d\d",
                        lines[2]), lines[2]
    assert re.fullmatch(r"finetune_blip: epoch 3 of 3 done, loss 1.5, probe captions changed 2, in \d+:\d\d:\d\d",
                        lines[5]), lines[5]
    assert len(lines) == 6


def test_short_epochs_are_said_at_most_every_progress_s_and_the_last_always():
    stream = io.StringIO()
    progress = TrainProgress("train_scorer", epochs=50, start=0, every_s=3600, steps_per_epoch=4, stream=stream)
    for epoch in range(50):
        for step in range(1, 5):
            progress.step(epoch, step, loss=0.5)
        progress.epoch(epoch, {"train loss": 0.5})
    assert re.fullmatch(r"train_scorer: epoch 50 of 50 done, train loss 0.5, in \d+:\d\d:\d\d\n", stream.getvalue())


def test_a_pool_says_when_it_loses_actors_and_when_it_has_them_back():
    """`PoolWatch` on Ray Data's counts of each pool's actors, step by step: nothing while the
    pools start, run and end; a line when actors start restarting (again if more do), one
    when all are up again."""
    from types import SimpleNamespace

    from ray.data._internal.actor_autoscaler.autoscaling_actor_pool import ActorPoolInfo
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    from rayjobs.progress import PoolWatch

    pools = [ActorPoolMapOperator.__new__(ActorPoolMapOperator) for _ in range(2)]
    task = object()  # a task operator of the stream: not a pool
    said = io.StringIO()
    watch = PoolWatch.over(["captioner", "inpainter"])(stream=said)
    steps = [(0, 0, 0), (1, 0, 2), (1, 0, 2), (1, 1, 1), (1, 2, 0), (1, 0, 2), (1, 0, 2), (0, 0, 0)]
    for captioner, inpainter_up, inpainter_restarting in steps:
        counts = [(captioner, 0), (inpainter_up, inpainter_restarting)]
        for op, (up, restarting) in zip(pools, counts):
            op.get_actor_info = lambda up=up, restarting=restarting: ActorPoolInfo(running=up, pending=0,
                                                                                   restarting=restarting)
        watch.on_execution_step(SimpleNamespace(_topology={task: None, **dict.fromkeys(pools)}))
    assert said.getvalue().splitlines() == [
        "inpainter pool: 0 of 2 actors up, 2 restarting (their worker or node died)",
        "inpainter pool: 2 of 2 actors up again",
        "inpainter pool: 0 of 2 actors up, 2 restarting (their worker or node died)"]


def test_a_stream_without_a_known_total_counts_rows_and_gives_no_eta(tmp_path):
    """A streamed listing (a WebDataset source) knows its total only at its end: the lines
    count the rows committed, with no "of N" and no ETA."""
    out = str(tmp_path / "generate")
    stream = io.StringIO()
    with CommitProgress("generate", out, total=None, done=0, every_s=0.05, stream=stream, terminal=False):
        CommitLog(out).commit(sample_rows(["a", "b"], ["", "unreadable: x"]))
        _wait_for(lambda: stream.getvalue().count("\n") == 1, "the line of the first part")
    lines = stream.getvalue().splitlines()
    assert re.fullmatch(r"generate: 2 rows committed \(1 errors\), [\d.]+ rows/s, ETA unknown", lines[0]), lines
    assert re.fullmatch(r"generate: 2 rows committed \(1 errors\), .+, in \d+:\d\d:\d\d", lines[-1]), lines
