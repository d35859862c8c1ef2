"""``deepspeed.monitor.monitor``: ``Monitor`` and ``MonitorMaster``."""

from zerostep.core.monitoring.monitors import Monitor, MonitorMaster

__all__ = ["Monitor", "MonitorMaster"]
