"""Wall-clock timers with DeepSpeed's names and log format (``wall_clock_breakdown: true``).

On CUDA a timer records a pair of events on the current stream (no host synchronisation when it starts or
stops; reading ``elapsed_ms`` waits for the end event); on CPU it reads ``time.perf_counter``. Nothing here
is created when ``wall_clock_breakdown`` is false: the engine holds ``None`` instead of timers and tests
for it once per phase.

DeepSpeed's names: ``fwd_microstep`` ... ``step_microstep`` time one micro-step (reset every micro-step),
``fwd`` ... ``step`` accumulate over one accumulation window (reset at every boundary). The functional
engine's ``engine.step`` is timed from outside as ``train_batch`` (DeepSpeed's pipeline-engine name for
a whole batch) by ``StepTimers``, and inside by the engine's own ``WallClockTimers`` (``Engine.timers``)
per phase: ``fwd_bwd`` (forward and backward of every micro-batch: one compiled graph, so forward is not
split from backward), ``bwd_allreduce`` (the reducer's collectives and accumulation; on CPU the host
time to issue them where they run asynchronously) and ``step`` (graph A, the host's skip decision,
graph B and the stage 1-2 all-gather).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

FORWARD_MICRO_TIMER = "fwd_microstep"
FORWARD_GLOBAL_TIMER = "fwd"
BACKWARD_MICRO_TIMER = "bwd_microstep"
BACKWARD_GLOBAL_TIMER = "bwd"
BACKWARD_INNER_MICRO_TIMER = "bwd_inner_microstep"
BACKWARD_INNER_GLOBAL_TIMER = "bwd_inner"
BACKWARD_REDUCE_MICRO_TIMER = "bwd_allreduce_microstep"
BACKWARD_REDUCE_GLOBAL_TIMER = "bwd_allreduce"
STEP_MICRO_TIMER = "step_microstep"
STEP_GLOBAL_TIMER = "step"
TRAIN_BATCH_TIMER = "train_batch"
FORWARD_BACKWARD_TIMER = "fwd_bwd"  # the functional step's forward + backward (one graph when compiled)

MICRO_TIMERS = (
    FORWARD_MICRO_TIMER,
    BACKWARD_MICRO_TIMER,
    BACKWARD_INNER_MICRO_TIMER,
    BACKWARD_REDUCE_MICRO_TIMER,
    STEP_MICRO_TIMER,
)
GLOBAL_TIMERS = (
    FORWARD_GLOBAL_TIMER,
    BACKWARD_GLOBAL_TIMER,
    BACKWARD_INNER_GLOBAL_TIMER,
    BACKWARD_REDUCE_GLOBAL_TIMER,
    STEP_GLOBAL_TIMER,
)


class WallClockTimer:
    """One named timer: a sum of start/stop intervals since the last reset, in milliseconds."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.use_events = device.type == "cuda"
        self.running = False
        self._intervals: list[tuple] = []  # (start, end) events on CUDA, (t0, t1) seconds on CPU
        self._start: object = None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"timer {self.name!r} is already running")
        if self.use_events:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()
        self.running = True

    def stop(self) -> None:
        if not self.running:
            raise RuntimeError(f"timer {self.name!r} is not running")
        if self.use_events:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self._intervals.append((self._start, end))
        self._start = None
        self.running = False

    def elapsed_ms(self, reset: bool = True) -> float:
        """Milliseconds over the stopped intervals (a running interval is not counted)."""
        total = 0.0
        for start, end in self._intervals:
            if self.use_events:
                end.synchronize()
                total += start.elapsed_time(end)
            else:
                total += (end - start) * 1000.0
        if reset:
            self._intervals.clear()
        return total

    def reset(self) -> None:
        self._intervals.clear()
        self._start = None
        self.running = False


class WallClockTimers:
    """DeepSpeed's ``SynchronizedWallClockTimer``: ``timers(name).start()``, ``log(names)``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.timers: dict[str, WallClockTimer] = {}

    def __call__(self, name: str) -> WallClockTimer:
        timer = self.timers.get(name)
        if timer is None:
            timer = self.timers[name] = WallClockTimer(name, self.device)
        return timer

    def start(self, names: Iterable[str]) -> None:
        for name in names:
            self(name).start()

    def stop(self, names: Iterable[str]) -> None:
        for name in names:
            self(name).stop()

    def elapsed(self, names: Iterable[str], reset: bool = True) -> dict[str, float]:
        """``{name: ms}`` for the named timers that exist, in the order given."""
        return {n: self.timers[n].elapsed_ms(reset) for n in names if n in self.timers}

    @contextmanager
    def timing(self, *names: str) -> Iterator[None]:
        self.start(names)
        try:
            yield
        finally:
            self.stop(names)


def format_timers(elapsed: dict[str, float]) -> str:
    """DeepSpeed's line: ``time (ms) | fwd_microstep: 1.23 | bwd_microstep: 4.56``."""
    return "time (ms)" + "".join(f" | {name}: {ms:.2f}" for name, ms in elapsed.items())


class EngineTimers:
    """The facade's timers: each phase starts and stops its micro and global timer together.

    ``micro`` holds the last micro-step's milliseconds (read at every ``step()``), ``window`` the last
    accumulation window's (read at every boundary); ``as_dict()`` merges both, DeepSpeed's
    ``get_wall_clock_timers()``. Reading synchronises on the end events (CUDA), once per ``step()``.
    """

    FORWARD = (FORWARD_MICRO_TIMER, FORWARD_GLOBAL_TIMER)
    BACKWARD = (BACKWARD_MICRO_TIMER, BACKWARD_GLOBAL_TIMER)
    BACKWARD_INNER = (BACKWARD_INNER_MICRO_TIMER, BACKWARD_INNER_GLOBAL_TIMER)
    BACKWARD_REDUCE = (BACKWARD_REDUCE_MICRO_TIMER, BACKWARD_REDUCE_GLOBAL_TIMER)
    STEP = (STEP_MICRO_TIMER, STEP_GLOBAL_TIMER)

    def __init__(self, device: torch.device | str) -> None:
        self.timers = WallClockTimers(device)
        for name in MICRO_TIMERS + GLOBAL_TIMERS:
            self.timers(name)
        self.micro: dict[str, float] = {}
        self.window: dict[str, float] = {}

    def start(self, names: tuple[str, str]) -> None:
        self.timers.start(names)

    def stop(self, names: tuple[str, str]) -> None:
        self.timers.stop(names)

    def stop_if_running(self, names: tuple[str, str]) -> None:
        self.timers.stop(n for n in names if self.timers(n).running)

    def end_micro_step(self, boundary: bool) -> None:
        self.micro = self.timers.elapsed(MICRO_TIMERS)
        if boundary:
            self.window = self.timers.elapsed(GLOBAL_TIMERS)

    def as_dict(self) -> dict[str, float]:
        return {**self.micro, **self.window}


class StepTimers:
    """Timers around the functional engine from the training loop: ``with timers.timing("train_batch"):
    state = engine.step(state, batch)``; ``report(step)`` returns DeepSpeed's line every ``every`` steps
    (None otherwise) and resets. ``share(engine.timers)`` adds the engine's phase timers to the line."""

    def __init__(self, device: torch.device | str, every: int) -> None:
        self.timers = WallClockTimers(device)
        self.every = max(1, int(every))
        self.last: dict[str, float] = {}

    def share(self, timers: WallClockTimers | None) -> None:
        """Read ``timers`` (an engine's phase timers) with ``train_batch``, as one set."""
        if timers is not None:
            timers.timers.update(self.timers.timers)
            self.timers = timers

    def timing(self, *names: str):
        return self.timers.timing(*names)

    def end_step(self, step: int) -> str | None:
        """Read (and reset) every timer after optimizer step ``step``; DeepSpeed's line when it is due."""
        self.last = self.timers.elapsed(list(self.timers.timers))
        return format_timers(self.last) if step % self.every == 0 else None

    def as_dict(self) -> dict[str, float]:
        return dict(self.last)
