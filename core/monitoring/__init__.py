"""zerostep.core.monitoring: seeing the run, as DeepSpeed's timers, monitors and progress lines do.

- ``timers``: ``WallClockTimers`` (DeepSpeed's ``SynchronizedWallClockTimer``: CUDA events on GPU,
  ``perf_counter`` on CPU), ``EngineTimers`` (the facade's fwd/bwd/bwd_inner/bwd_allreduce/step timers at
  micro-step and global granularity) and ``StepTimers`` (around the functional ``engine.step``);
- ``throughput``: ``ThroughputTimer`` (``engine.tput_timer``: samples/s, DeepSpeed's speed line);
- ``monitors``: ``MonitorMaster`` over TensorBoard, CSV and wandb writers, from the config;
- ``progress``: DeepSpeed's ``step=N, skipped=K, lr=[...], mom=[...]`` line and the rank-0 logger;
- ``memory``: ``memory_breakdown``'s per-rank line (CUDA allocated/reserved and peaks, host RSS);
- ``train_loop``: ``TrainMonitoring``, all of it for a loop over the functional ``engine.step``.
"""

from zerostep.core.monitoring.monitors import (
    CSVMonitor,
    Monitor,
    MonitorMaster,
    TensorBoardMonitor,
    WandbMonitor,
)
from zerostep.core.monitoring.progress import log_rank0, progress_line
from zerostep.core.monitoring.throughput import ThroughputTimer
from zerostep.core.monitoring.timers import EngineTimers, StepTimers, WallClockTimers, format_timers

__all__ = [
    "CSVMonitor",
    "EngineTimers",
    "Monitor",
    "MonitorMaster",
    "StepTimers",
    "TensorBoardMonitor",
    "ThroughputTimer",
    "WallClockTimers",
    "WandbMonitor",
    "format_timers",
    "log_rank0",
    "progress_line",
]
