"""``ThroughputTimer``: DeepSpeed's ``engine.tput_timer``.

The loader calls ``start()`` as it yields each micro-batch (or the engine's forward does when there is
no loader), the engine ``stop()`` at each ``step()``. The first ``start_step`` optimizer steps are warm-up
and not timed (DeepSpeed's default is 2). With ``report`` set, every ``steps_per_output`` optimizer steps
it logs DeepSpeed's speed line::

    epoch=0/micro_step=20/global_step=10, RunningAvgSamplesPerSec=..., CurrSamplesPerSec=...,
    MemAllocated=...GB, MaxMemAllocated=...GB

``synchronize`` waits for the device at ``start``/``stop`` so the seconds are the device's, as DeepSpeed's
``timers.throughput.synchronized``; the facade sets it only with ``wall_clock_breakdown`` (no extra host
synchronisation otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

_EPSILON = 1e-6


class ThroughputTimer:
    def __init__(
        self,
        batch_size: int,
        start_step: int = 2,
        steps_per_output: int | None = None,
        logging_fn: Callable[[str], None] | None = None,
        synchronize: bool = False,
        device: torch.device | str = "cpu",
        flops_per_sample: float | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.start_step = start_step
        self.steps_per_output = steps_per_output
        self.logging = logging_fn
        self.synchronize = synchronize and torch.device(device).type == "cuda"
        self.flops_per_sample = flops_per_sample  # model FLOPs per sample (fwd+bwd) when known: TFLOP/s
        self.epoch_count = 0
        self.micro_step_count = 0
        self.global_step_count = 0
        self.total_elapsed = 0.0  # seconds over timed (post warm-up) steps
        self.step_elapsed = 0.0  # seconds in the current accumulation window
        self._started: float | None = None
        self._timing = False

    def update_epoch_count(self) -> None:
        self.epoch_count += 1
        self.micro_step_count = 0

    def start(self) -> None:
        self._timing = True
        if self.global_step_count >= self.start_step:
            if self.synchronize:
                torch.cuda.synchronize()
            self._started = time.perf_counter()

    def stop(self, global_step: bool = False, report_speed: bool = False) -> None:
        if not self._timing:
            return
        self._timing = False
        self.micro_step_count += 1
        if global_step:
            self.global_step_count += 1
        if self._started is None:
            return
        if self.synchronize:
            torch.cuda.synchronize()
        duration = time.perf_counter() - self._started
        self._started = None
        self.total_elapsed += duration
        self.step_elapsed += duration
        if not global_step:
            return
        if report_speed and self.logging is not None and self._is_report_boundary():
            self.logging(self.speed_line())
        self.step_elapsed = 0.0

    def _is_report_boundary(self) -> bool:
        return bool(self.steps_per_output) and self.global_step_count % self.steps_per_output == 0

    def timed_steps(self) -> int:
        return max(0, self.global_step_count - self.start_step)

    def avg_samples_per_sec(self) -> float:
        """Samples per second over the timed optimizer steps; 0.0 before any (DeepSpeed: -inf)."""
        steps = self.timed_steps()
        if steps <= 0 or self.total_elapsed <= 0:
            return 0.0
        return steps * self.batch_size / self.total_elapsed

    def speed_line(self) -> str:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        alloc = round(torch.cuda.memory_allocated() / 1024**3, 2) if cuda else 0.0
        peak = round(torch.cuda.max_memory_allocated() / 1024**3, 2) if cuda else 0.0
        counts = f"epoch={self.epoch_count}/micro_step={self.micro_step_count}"
        counts += f"/global_step={self.global_step_count}"
        line = (
            f"{counts}, "
            f"RunningAvgSamplesPerSec={self.avg_samples_per_sec()}, "
            f"CurrSamplesPerSec={self.batch_size / (self.step_elapsed + _EPSILON)}, "
            f"MemAllocated={alloc}GB, MaxMemAllocated={peak}GB"
        )
        if self.flops_per_sample:
            line += f", TFLOPs={self.avg_samples_per_sec() * self.flops_per_sample / 1e12:.3f}"
        return line
