"""Config blocks for seeing a run beyond the monitors: ``flops_profiler``, ``comms_logger``, ``comet``
(DeepSpeed 0.19's keys and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from zerostep.core.config.values import Block, boolean, choice, fail, integer, non_negative, optional, text


@dataclass(frozen=True)
class FlopsProfilerConfig:
    enabled: bool = False
    recompute_fwd_factor: float = 0.0  # extra forward recomputation in the backward (activation checkpoints)
    profile_step: int = 1  # the global step whose micro-steps are profiled
    module_depth: int = -1  # -1: every depth
    top_modules: int = 1
    detailed: bool = True
    output_file: str | None = None  # None: stdout


@dataclass(frozen=True)
class CommsLoggerConfig:
    enabled: bool = False
    verbose: bool = False  # one line per collective as it completes
    prof_all: bool = True  # every collective; else only those named in prof_ops
    prof_ops: tuple[str, ...] = field(default_factory=tuple)
    debug: bool = False  # the caller's function name in each record


@dataclass(frozen=True)
class CometConfig:
    enabled: bool = False
    samples_log_interval: int = 100
    project: str | None = None
    workspace: str | None = None
    api_key: str | None = None
    experiment_name: str | None = None
    experiment_key: str | None = None
    online: bool | None = None
    mode: str | None = None


def parse_flops_profiler(block: Block | None) -> FlopsProfilerConfig:
    if block is None:
        return FlopsProfilerConfig()
    d = FlopsProfilerConfig()
    config = FlopsProfilerConfig(
        enabled=block.take("enabled", d.enabled, boolean),
        recompute_fwd_factor=block.take("recompute_fwd_factor", d.recompute_fwd_factor, non_negative),
        profile_step=block.take("profile_step", d.profile_step, lambda p, v: integer(p, v, minimum=0)),
        module_depth=block.take("module_depth", d.module_depth, lambda p, v: integer(p, v, minimum=-1)),
        top_modules=block.take("top_modules", d.top_modules, lambda p, v: integer(p, v, minimum=1)),
        detailed=block.take("detailed", d.detailed, boolean),
        output_file=block.take("output_file", d.output_file, optional(_path)),
    )
    block.finish()
    return config


def _path(path: str, value: object) -> str | None:
    result = text(path, value)
    return result or None  # DeepSpeed treats "" as stdout too


def _op_names(path: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise fail(path, value, 'must be a list of collective names (e.g. ["all_reduce", "all_gather"])')
    return tuple(value)


def parse_comms_logger(block: Block | None) -> CommsLoggerConfig:
    if block is None:
        return CommsLoggerConfig()
    d = CommsLoggerConfig()
    config = CommsLoggerConfig(
        enabled=block.take("enabled", d.enabled, boolean),
        verbose=block.take("verbose", d.verbose, boolean),
        prof_all=block.take("prof_all", d.prof_all, boolean),
        prof_ops=block.take("prof_ops", d.prof_ops, _op_names),
        debug=block.take("debug", d.debug, boolean),
    )
    block.finish()
    return config


def parse_comet(block: Block | None) -> CometConfig:
    if block is None:
        return CometConfig()
    d = CometConfig()
    name = optional(text)
    config = CometConfig(
        enabled=block.take("enabled", d.enabled, boolean),
        samples_log_interval=block.take(
            "samples_log_interval", d.samples_log_interval, lambda p, v: integer(p, v, minimum=1)
        ),
        project=block.take("project", d.project, name),
        workspace=block.take("workspace", d.workspace, name),
        api_key=block.take("api_key", d.api_key, name),
        experiment_name=block.take("experiment_name", d.experiment_name, name),
        experiment_key=block.take("experiment_key", d.experiment_key, name),
        online=block.take("online", d.online, optional(boolean)),
        mode=block.take("mode", d.mode, optional(choice(("get", "create", "get_or_create")))),
    )
    block.finish()
    return config
