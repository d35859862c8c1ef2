"""``deepspeed.monitor`` under DeepSpeed's names: ``zerostep.monitor.monitor.MonitorMaster`` and the
TensorBoard, CSV and wandb monitors (implemented in ``zerostep.core.monitoring.monitors``)."""

from zerostep.core.monitoring.monitors import (
    CSVMonitor,
    Monitor,
    MonitorMaster,
    TensorBoardMonitor,
    WandbMonitor,
)

csvMonitor = CSVMonitor  # DeepSpeed's spelling (deepspeed.monitor.csv_monitor.csvMonitor)

__all__ = ["CSVMonitor", "Monitor", "MonitorMaster", "TensorBoardMonitor", "WandbMonitor", "csvMonitor"]
