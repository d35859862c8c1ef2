"""``deepspeed.monitor.csv_monitor``: ``csvMonitor`` (DeepSpeed's spelling) and ``CSVMonitor``."""

from zerostep.core.monitoring.monitors import CSVMonitor

csvMonitor = CSVMonitor

__all__ = ["CSVMonitor", "csvMonitor"]
