"""How a compressed-communication optimizer tells the engine which update variant a step runs.

DeepSpeed's 1-bit Adam, 0/1 Adam and 1-bit LAMB switch, step by step, between an update fed the
all-reduced gradient (the engine's ordinary step) and updates fed this rank's *local* gradient that
communicate themselves, compressed (DeepSpeed toggles its engine's ``enable_backward_allreduce``). Here
the optimizer declares its variants and a pure host function of the step number that picks one, so the
engine decides on the host, without reading a device tensor, and a resumed state (whose step count is
in the checkpoint) picks the same variant the uninterrupted run would have.

- ``variants``: name -> in-place apply function (``ApplyFn``);
- ``reduced``: the one variant fed the all-reduced gradient; it is the optimizer's ``apply_fn``, the one
  the engine compiles into its ordinary step;
- ``compressed_calls``: per variant, how many compressed all-reduces it runs per leaf (byte accounting);
- ``variant_at(k)``: the variant of the ``k``-th applied step (1-based; skipped fp16 steps do not count);
- ``after_load``: optional, ``opt_state -> opt_state`` once a checkpoint is loaded (0/1 Adam checks its
  saved policy counters against the schedule).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zerostep.optim.base import ApplyFn, Optimizer


@dataclass(frozen=True)
class PhaseSchedule:
    variants: Mapping[str, ApplyFn]
    reduced: str
    compressed_calls: Mapping[str, int]
    variant_at: Callable[[int], str]
    after_load: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if self.reduced not in self.variants or set(self.compressed_calls) != set(self.variants):
            raise ValueError(
                f"PhaseSchedule: {self.reduced!r} / {sorted(self.compressed_calls)} do not "
                f"name the variants {sorted(self.variants)}"
            )

    @property
    def local(self) -> tuple[str, ...]:
        """The variants fed local gradients (the engine skips its gradient all-reduce for them)."""
        return tuple(name for name in self.variants if name != self.reduced)


def with_schedule(
    apply_fns: Mapping[str, ApplyFn],
    reduced: str,
    compressed_calls: Mapping[str, int],
    variant_at: Callable[[int], str],
    after_load: Callable[[Any], Any] | None = None,
) -> ApplyFn:
    """The reduced variant's apply function, carrying the schedule (``phase_schedule`` reads it)."""
    schedule = PhaseSchedule(dict(apply_fns), reduced, dict(compressed_calls), variant_at, after_load)
    apply = apply_fns[reduced]
    apply.schedule = schedule  # type: ignore[attr-defined]
    return apply


def phase_schedule(optimizer: Optimizer) -> PhaseSchedule | None:
    """The optimizer's schedule, or None for an ordinary optimizer (one variant, all-reduced grads)."""
    return getattr(optimizer.apply_fn, "schedule", None)


def with_variant(optimizer: Optimizer, name: str) -> Optimizer:
    """``optimizer`` whose update is its variant ``name``."""
    schedule = phase_schedule(optimizer)
    if schedule is None or name not in schedule.variants:
        raise ValueError(f"{optimizer.name} has no update variant {name!r}")
    return dataclasses.replace(optimizer, apply_fn=schedule.variants[name])
