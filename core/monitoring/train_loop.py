"""Monitoring for a loop over the functional engine (``zerostep train``): the config's monitors, the
whole-step timer and DeepSpeed's events per optimizer step.

``engine.step`` is one call (possibly compiled), so only the whole step is timed, as ``train_batch``,
and only with ``wall_clock_breakdown`` (no timer otherwise). When the config enables no TensorBoard
monitor but the ``tensorboard`` package is installed, events also go to ``default_tensorboard_dir``
(``zerostep train`` passes ``OUT/tensorboard``, beside ``metrics.jsonl``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from zerostep.core.autocast import loss_scaling_of
from zerostep.core.monitoring.comms_logger import COMMS_LOGGER, note_comms_logger
from zerostep.core.monitoring.events import step_events
from zerostep.core.monitoring.memory import memory_line
from zerostep.core.monitoring.monitors import MonitorMaster, TensorBoardMonitor
from zerostep.core.monitoring.profile_step import StepProfile
from zerostep.core.monitoring.timers import TRAIN_BATCH_TIMER, StepTimers


class TrainMonitoring:
    def __init__(
        self, config: Any, rank: int, device: torch.device, default_tensorboard_dir: Path | None = None
    ) -> None:
        self.config = config
        self.rank = rank
        self.device = device
        self.timers = StepTimers(device, config.steps_per_print) if config.wall_clock_breakdown else None
        self.monitor = MonitorMaster(config, rank)
        self.tensorboard_dir: Path | None = None
        if self.monitor.tb_monitor is not None:
            self.tensorboard_dir = Path(self.monitor.tb_monitor.log_dir)
        elif rank == 0 and default_tensorboard_dir is not None and importlib.util.find_spec("tensorboard"):
            tb = dataclasses.replace(
                config.tensorboard, enabled=True, output_path=str(default_tensorboard_dir), job_name=""
            )
            self.monitor.tb_monitor = TensorBoardMonitor(tb)
            self.monitor.enabled = True
            self.tensorboard_dir = default_tensorboard_dir

        self.profile: StepProfile | None = None
        note_comms_logger(config, compiled=False)  # the config's comms_logger; watch_model notes compile

    def watch_engine(self, engine: Any) -> None:
        """Print and log ``engine``'s phase timers (``fwd_bwd``, ``bwd_allreduce``, ``step``) with
        ``train_batch``."""
        if self.timers is not None:
            self.timers.share(engine.timers)

    def watch_model(self, model: torch.nn.Module, compiled: bool = False) -> None:
        """The config's ``flops_profiler`` over ``model``: the ``engine.step`` of global step
        ``profile_step`` (steps done before it) runs profiled; each forward of the model counts as
        forward, the rest of the step (backward, reduction, update) as the step."""
        if compiled and self.config.comms_logger.enabled:
            COMMS_LOGGER.compiled_engines += 1  # the summary notes the collectives it could not see
        if self.config.flops_profiler.enabled:
            self.profile = StepProfile(self.config.flops_profiler, model, None, self.rank)

    def timing(self, step: int = -1):
        """Context around ``engine.step`` (``step``: the steps done before it): times it as
        ``train_batch`` when the timers are on; profiles it at the flops profiler's ``profile_step``."""
        timed = nullcontext() if self.timers is None else self.timers.timing(TRAIN_BATCH_TIMER)
        if self.profile is None or step != self.config.flops_profiler.profile_step:
            return timed
        return _both(timed, self.profile.phase("step", step), self.profile)

    def after_step(self, state: Any, samples: int) -> None:
        """After an ``engine.step`` that returned ``state`` (``samples`` seen so far): events to the
        monitors (the loss scale after its update, as DeepSpeed's ``cur_scale``); on rank 0 DeepSpeed's
        ``time (ms) | train_batch: ...`` line every ``steps_per_print`` steps."""
        step, metrics = int(state.step), state.metrics
        line = None if self.timers is None else self.timers.end_step(step)  # reads and resets
        if self.monitor.enabled:
            scale = float(state.scaler.scale) if loss_scaling_of(self.config).enabled else None
            events = step_events(samples, float(metrics.loss), float(metrics.lr), scale)
            if self.timers is not None:
                timed = self.timers.as_dict().items()
                events += [(f"Train/Samples/elapsed_time_ms_{n}", ms, samples) for n, ms in timed]
            self.monitor.write_events(events)
        if line is not None and self.rank == 0:
            print(line, flush=True)
        if self.config.memory_breakdown and step % max(1, self.config.steps_per_print) == 0:
            print(memory_line(self.rank, step, self.device), flush=True)

    def close(self) -> None:
        """Close the monitors; with the config's ``comms_logger`` on, print its summary (rank 0)."""
        self.monitor.close()
        if self.config.comms_logger.enabled and self.rank == 0:
            print(COMMS_LOGGER.summary_text(), flush=True)


@contextmanager
def _both(timed: Any, profiled: Any, profile: StepProfile):
    with timed, profiled:
        yield
    profile.finish()
