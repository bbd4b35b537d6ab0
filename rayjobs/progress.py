"""What a job says while it runs: its own progress, short enough to read in a log.

Under `ray job submit` or in CI the output is not a terminal, and a redrawn progress bar
becomes a line per redraw. So the streaming jobs print one line every `progress_s`
seconds in which something was committed, and a last line when the stream ends; on a
terminal they draw a tqdm bar instead. Ray Data's own per-operator bars are off unless
`ray_progress=true`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

from blipinpaint.commit_log import CommitLog

log = logging.getLogger(__name__)


def clock(seconds: float) -> str:
    """h:mm:ss, for an ETA or an elapsed time."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def say(stream: TextIO, line: str) -> None:
    """One line, at once. Written, not printed: in a Ray Train worker `print` goes through
    Train's logger as well as the stream, and the line would reach the job's log twice."""
    stream.write(line + "\n")
    stream.flush()


def eta(remaining: float, rate: float | None) -> str:
    return clock(remaining / rate) if rate else "unknown"


class CommitProgress:
    """Rows committed (samples and error rows) of `total`, read from the commit markers of
    `out_dir` by a thread of the driver: the markers are the truth of what is done, and
    only the ones written since the last look are read.

    `done`: rows already committed when the stream starts (earlier runs). A line:

        generate: 4,096 of 10,000 rows committed (12 errors), 3.41 rows/s, ETA 0:28:51
    """

    def __init__(self, job: str, out_dir: str, total: int, done: int, every_s: float,
                 stream: TextIO | None = None, terminal: bool | None = None):
        self.job, self.total, self.every_s = job, total, every_s
        self.log = CommitLog(out_dir)
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.rows, self.errors, self.seen = done, 0, set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name=f"{job}-progress", daemon=True)
        self.bar = None

    def __enter__(self) -> CommitProgress:
        earlier = self.log.markers()  # their rows are in `done`; their errors count too
        self.seen = {m["name"] for m in earlier}
        self.errors = sum(len(m["errors"]) for m in earlier)
        self.started = self.last_time = time.monotonic()
        self.initial = self.last_rows = self.rows
        if self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.rows, unit="row", desc=self.job, file=self.stream)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._look()
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(time.monotonic(), last=True)

    def _look(self) -> None:
        """Count the parts committed since the last look."""
        for marker in self.log.markers(skip=self.seen):
            self.seen.add(marker["name"])
            self.rows += len(marker["samples"]) + len(marker["errors"])
            self.errors += len(marker["errors"])
        if self.bar is not None:
            self.bar.update(self.rows - self.bar.n)
            self.bar.set_postfix(errors=self.errors, refresh=False)

    def _watch(self) -> None:
        # A bar is redrawn in place every second; a log gets a line per `every_s`.
        while not self.stop.wait(min(self.every_s, 1.0) if self.terminal else self.every_s):
            try:
                self._look()
            except OSError as err:  # the store did not answer this time: the job goes on
                log.warning("%s: progress not read this time: %s", self.job, err)
                continue
            if self.bar is None and self.rows > self.last_rows:
                self._line(time.monotonic())

    def _line(self, now: float, last: bool = False) -> None:
        since = self.started if last else self.last_time
        new = self.rows - (self.initial if last else self.last_rows)
        rate = new / (now - since) if now > since and new else None
        speed = f"{rate:.3g} rows/s" if rate else "no new rows"
        known = self.total is not None  # None: a stream that lists its inputs as it goes
        left = eta(self.total - self.rows, rate) if known else "unknown"
        tail = f"in {clock(now - self.started)}" if last else f"ETA {left}"
        of = f" of {self.total:,}" if known else ""  # a streamed listing: the total is known at its end
        counts = f"{self.rows:,}{of} rows committed ({self.errors:,} errors)"
        say(self.stream, f"{self.job}: {counts}, {speed}, {tail}")
        self.last_time, self.last_rows = now, self.rows


class PoolWatch(ExecutionCallback):
    """Says when a model pool loses actors and when it has them all again, a line each:

        inpainter pool: 0 of 2 actors up, 2 restarting (their worker or node died)
        inpainter pool: 2 of 2 actors up again

    Ray restarts a pool's actors that died (Ray Data asks for restarts without limit) on
    whatever node has room, a replacement node once it joins; until then the pool is short.
    Read from Ray Data's own count of each pool's restarting actors, at each step of the
    stream's scheduling loop (in the driver): an undisturbed run says nothing, and neither
    does a pool that starts or ends. `names`: the pools' stage names, in the stream's order
    (their operators are all `MapBatches(ModelStage)`); `over` makes the class Ray Data
    instantiates, one per execution of the dataset it is added to."""

    names: tuple[str, ...] = ()

    @classmethod
    def over(cls, names: Sequence[str]) -> type[PoolWatch]:
        return type("ModelPoolWatch", (cls,), {"names": tuple(names)})

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.restarting: dict[str, int] | None = {}  # by pool: its restarting actors when last seen

    def on_execution_step(self, executor) -> None:
        if self.restarting is None:
            return
        try:
            self._look(executor)
        except Exception as err:  # noqa: BLE001 - Ray Data's internals moved: the stream goes on, unwatched
            log.warning("the model pools are not watched: %r", err)
            self.restarting = None

    def _look(self, executor) -> None:
        pools = [op for op in executor._topology if isinstance(op, ActorPoolMapOperator)]
        for name, op in zip(self.names if len(self.names) == len(pools) else [op.name for op in pools], pools):
            info, said = op.get_actor_info(), self.restarting.get(name, 0)
            size = info.running + info.restarting
            if info.restarting > said:
                self._say(f"{name} pool: {info.running} of {size} actors up, {info.restarting} restarting "
                          "(their worker or node died)")
            elif said and not info.restarting and info.running:  # (a pool ended short says nothing)
                self._say(f"{name} pool: {info.running} of {size} actors up again")
            self.restarting[name] = info.restarting

    def _say(self, line: str) -> None:
        say(self.stream or sys.stdout, line)


class TrainProgress:
    """Rank 0's progress through a training run. An epoch's line (its figures, an ETA over
    the epochs left) at most every `every_s` seconds, and always the last epoch's; within
    an epoch longer than that, a line every `every_s` seconds with the mean loss since the
    line before. `start`: the first epoch this run trains (a resumed run skips some)."""

    def __init__(self, job: str, epochs: int, start: int, every_s: float, steps_per_epoch: int | None = None,
                 stream: TextIO | None = None):
        self.job, self.epochs, self.start, self.every_s = job, epochs, start, every_s
        self.steps_per_epoch, self.stream = steps_per_epoch, stream or sys.stdout
        self.started = self.last = time.monotonic()
        self.losses: list[float] = []

    def _eta(self, epochs_done: float, now: float) -> str:
        rate = epochs_done / (now - self.started) if now > self.started else None
        return eta(self.epochs - self.start - epochs_done, rate)

    def step(self, epoch: int, step: int, loss: float) -> None:
        """After `step` (counted from 1 in `epoch`) with its loss."""
        self.losses.append(loss)
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        of = f" of {self.steps_per_epoch:,}" if self.steps_per_epoch else ""
        done = epoch - self.start + min(step / self.steps_per_epoch, 1.0) if self.steps_per_epoch else None
        mean = sum(self.losses) / len(self.losses)
        say(self.stream, f"{self.job}: epoch {epoch + 1} of {self.epochs}, step {step:,}{of}, loss {mean:.4g} (mean "
                         f"of {len(self.losses)} steps), ETA {self._eta(done, now) if done else 'after this epoch'}")
        self.last, self.losses = now, []

    def epoch(self, epoch: int, figures: dict[str, float | None]) -> None:
        """After `epoch` (counted from 0), with its figures (None: not measured)."""
        now, last = time.monotonic(), epoch + 1 == self.epochs
        self.losses = []
        if now - self.last < self.every_s and not last:
            return
        said = ", ".join(f"{name} {value:.4g}" for name, value in figures.items() if value is not None)
        tail = f"in {clock(now - self.started)}" if last else f"ETA {self._eta(epoch + 1 - self.start, now)}"
        say(self.stream, f"{self.job}: epoch {epoch + 1} of {self.epochs} done, {said}, {tail}")
        self.last = now
