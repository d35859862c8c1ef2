"""``deepspeed.monitor.tensorboard``: ``TensorBoardMonitor``."""

from zerostep.core.monitoring.monitors import TensorBoardMonitor

__all__ = ["TensorBoardMonitor"]
