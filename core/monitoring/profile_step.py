"""The config's ``flops_profiler`` for an engine: on rank 0, the micro-steps of global step
``profile_step`` (each forward, backward and the step) run under a :class:`FlopsProfiler`; at that step's
boundary the profile is printed (or written to ``output_file``) and the profiler ends, as DeepSpeed's
engine does. Engines hold None when the block is off, so no step pays for a check beyond ``is None``."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import nn

from zerostep.core.config.observe import FlopsProfilerConfig
from zerostep.core.monitoring.flops_profiler import FlopsProfiler, emit_profile


class StepProfile:
    def __init__(self, config: FlopsProfilerConfig, model: nn.Module, engine: Any, rank: int) -> None:
        self.config = config
        self.rank = rank
        self.profiler = FlopsProfiler(
            model, ds_engine=engine, recompute_fwd_factor=config.recompute_fwd_factor
        )
        self.done = False
        self.text: str | None = None  # the printed profile, kept for callers and tests

    def phase(self, name: str, global_step: int) -> AbstractContextManager[None]:
        """Context around one phase ("forward", "backward", "step") of global step ``global_step``:
        starts the profile at the first phase of ``profile_step``."""
        if self.done or self.rank != 0 or global_step != self.config.profile_step:
            return nullcontext()
        if not self.profiler.started:
            self.profiler.start_profile()
        return self.profiler.section(name)

    def finish(self) -> None:
        """At the profiled step's boundary: print the profile and end it (nothing otherwise)."""
        if not self.profiler.started:
            return
        c = self.config
        self.text = self.profiler.profile_text(c.profile_step, c.module_depth, c.top_modules, c.detailed)
        emit_profile(self.text, c.output_file)
        self.profiler.end_profile()
        self.done = True
