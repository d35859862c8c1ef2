"""``deepspeed.monitor.wandb``: ``WandbMonitor``."""

from zerostep.core.monitoring.monitors import WandbMonitor

__all__ = ["WandbMonitor"]
