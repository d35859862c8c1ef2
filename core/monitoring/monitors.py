"""Monitors from the config, as DeepSpeed's ``deepspeed.monitor``: each writes ``(tag, value, step)``
events; ``MonitorMaster`` holds those the config enables and writes on rank 0 only.

- ``tensorboard``: event files through ``torch.utils.tensorboard.SummaryWriter`` in
  ``output_path/job_name`` (needs the ``tensorboard`` package: ``pip install 'zerostep[monitor]'``);
- ``csv_monitor``: one ``output_path/job_name/<tag with / as _>.csv`` per tag, header ``step,<last part
  of the tag>``, then ``step,value`` rows (DeepSpeed's layout);
- ``wandb``: ``wandb.init(project, group, entity=team)`` then ``wandb.log({tag: value}, step=step)``
  (``WANDB_MODE=offline`` works as wandb documents);
- ``comet``: a ``comet_ml`` experiment (``CometMonitor``), events thinned to ``samples_log_interval``.

A monitor whose library is missing raises ``ConfigError`` naming the key and what to install
(``pip install 'zerostep[monitor]'`` for TensorBoard, ``pip install wandb``).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Iterable
from typing import Any

from zerostep.errors import ConfigError

Event = tuple[str, float, int]


def _require(module: str, key: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{key}.enabled = true needs the '{module}' package, which is not installed: {install}"
        )


def _log_dir(output_path: str, job_name: str) -> str:
    # DeepSpeed joins output_path and job_name (an empty output_path means the working directory)
    path = os.path.join(output_path, job_name)
    os.makedirs(path, exist_ok=True)
    return path


class Monitor:
    """One writer of scalar events."""

    def write_events(self, events: Iterable[Event]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardMonitor(Monitor):
    def __init__(self, config: Any) -> None:
        _require("tensorboard", "tensorboard", "pip install 'zerostep[monitor]'")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = _log_dir(config.output_path, config.job_name)
        self.summary_writer = SummaryWriter(log_dir=self.log_dir)

    def write_events(self, events: Iterable[Event], flush: bool = True) -> None:
        for tag, value, step in events:
            self.summary_writer.add_scalar(tag, value, step)
        if flush:
            self.summary_writer.flush()

    def close(self) -> None:
        self.summary_writer.close()


class CSVMonitor(Monitor):
    def __init__(self, config: Any) -> None:
        self.log_dir = _log_dir(config.output_path, config.job_name)
        self._started: set[str] = set()  # files this monitor has written its header to

    def path(self, tag: str) -> str:
        return os.path.join(self.log_dir, tag.replace("/", "_").replace(" ", "_") + ".csv")

    def write_events(self, events: Iterable[Event]) -> None:
        for tag, value, step in events:
            path = self.path(tag)
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if path not in self._started:
                    self._started.add(path)
                    writer.writerow(["step", tag.rsplit("/", 1)[-1]])
                writer.writerow([step, value])


class WandbMonitor(Monitor):
    def __init__(self, config: Any) -> None:
        _require("wandb", "wandb", "pip install wandb")
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=config.project, group=config.group, entity=config.team)

    def write_events(self, events: Iterable[Event]) -> None:
        for tag, value, step in events:
            self._wandb.log({tag: value}, step=step)

    def close(self) -> None:
        self.run.finish()


class CometMonitor(Monitor):
    """``comet_ml.start(api_key, project, workspace, experiment_key, mode, online)``, the experiment named
    ``experiment_name``; each tag is logged at most once per ``samples_log_interval`` samples (DeepSpeed's
    schedule: a tag's first event, then one whenever ``step`` is that far past the last logged one)."""

    def __init__(self, config: Any) -> None:
        _require("comet_ml", "comet", "pip install 'zerostep[monitor]' (or pip install comet_ml)")
        import comet_ml

        self.interval = config.samples_log_interval
        self._last: dict[str, int] = {}  # tag -> step of its last logged event
        self.experiment = comet_ml.start(
            api_key=config.api_key,
            project=config.project,
            workspace=config.workspace,
            experiment_key=config.experiment_key,
            mode=config.mode,
            online=config.online,
        )
        if config.experiment_name is not None:
            self.experiment.set_name(config.experiment_name)

    def write_events(self, events: Iterable[Event]) -> None:
        for tag, value, step in events:
            last = self._last.get(tag)
            if last is not None and step - last < self.interval:
                continue
            self._last[tag] = step
            self.experiment.log_metric(tag, value, step=step)

    def close(self) -> None:
        self.experiment.end()


class MonitorMaster(Monitor):
    """DeepSpeed's ``engine.monitor``: the monitors ``config`` enables, on rank 0; ``enabled`` is true
    when any is enabled in the config (on every rank, so the engine gathers events everywhere alike)."""

    def __init__(self, config: Any, rank: int = 0) -> None:
        comet = getattr(config, "comet", None)
        comet_on = comet is not None and comet.enabled
        self.enabled = bool(
            config.tensorboard.enabled or config.csv_monitor.enabled or config.wandb.enabled or comet_on
        )
        self.tb_monitor: TensorBoardMonitor | None = None
        self.csv_monitor: CSVMonitor | None = None
        self.wandb_monitor: WandbMonitor | None = None
        self.comet_monitor: CometMonitor | None = None
        if rank != 0:
            return
        if config.tensorboard.enabled:
            self.tb_monitor = TensorBoardMonitor(config.tensorboard)
        if config.csv_monitor.enabled:
            self.csv_monitor = CSVMonitor(config.csv_monitor)
        if config.wandb.enabled:
            self.wandb_monitor = WandbMonitor(config.wandb)
        if comet_on:
            self.comet_monitor = CometMonitor(comet)

    def monitors(self) -> list[Monitor]:
        found = (self.tb_monitor, self.csv_monitor, self.wandb_monitor, self.comet_monitor)
        return [m for m in found if m is not None]

    def write_events(self, events: Iterable[Event]) -> None:
        events = [(str(tag), float(value), int(step)) for tag, value, step in events]
        for monitor in self.monitors():
            monitor.write_events(events)

    def close(self) -> None:
        for monitor in self.monitors():
            monitor.close()
