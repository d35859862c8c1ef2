"""The ``optimizer``, ``scheduler``, ``checkpoint`` and monitor blocks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from zerostep.core.config.values import (
    AUTO,
    Block,
    ConfigError,
    boolean,
    choice,
    did_you_mean,
    fail,
    integer,
    number,
    optional,
    text,
    warn,
)
from zerostep.optim.config import from_config
from zerostep.optim.registry import (
    NATIVE_OPTIMIZER_TYPES,
    OPTIMIZER_TYPES,
    SCHEDULER_TYPES,
    UNSUPPORTED_OPTIMIZER_TYPES,
)
from zerostep.optim.torch_adapter import refused_reason


def freeze(value: Any) -> Any:
    """A read-only copy of a JSON-like value: dicts become mappingproxies, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    return value


def thaw(value: Any) -> Any:
    """The plain JSON-like value behind :func:`freeze`."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    return value


def _json_like(path: str, value: Any) -> None:
    """Params go to optimizer and schedule constructors: only JSON values, finite numbers."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise fail(f"{path}.{key!r}", item, "config keys must be strings")
            _json_like(f"{path}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _json_like(f"{path}[{index}]", item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise fail(path, value, "must be a finite number (not NaN or infinity)")
    elif value is not None and not isinstance(value, (bool, int, float, str)):
        raise fail(path, value, "must be a JSON value (number, string, boolean, list, object or null)")


def _numbers_in_float32_range(path: str, value: Any) -> None:
    """Optimizer hyperparameters meet float32 state and arithmetic: 1e308 there is infinity."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _numbers_in_float32_range(f"{path}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _numbers_in_float32_range(f"{path}[{index}]", item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number(path, value)


def _params(block: Block) -> dict[str, Any]:
    raw = block.take("params", {}, lambda path, value: _mapping_of_json(path, value))
    return dict(raw)


def _mapping_of_json(path: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise fail(path, value, "must be a JSON object of the constructor's keyword arguments")
    _json_like(path, value)
    return value


def _record_params(block: Block, path: str, params: Mapping[str, Any]) -> None:
    for key in params:
        block.ctx.sources.setdefault(f"{path}.{key}", block.ctx.origin(f"{path}.{key}"))


# --- optimizer ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerConfig:
    type: str  # canonical lower-case name, one of zerostep.optim.registry.OPTIMIZER_TYPES
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def _optimizer_type(path: str, value: Any) -> str:
    name = text(path, value).lower()
    if name in OPTIMIZER_TYPES:
        return name
    supported = ", ".join(OPTIMIZER_TYPES)
    refused = refused_reason(name)
    if refused is not None:  # LBFGS, SparseAdam: torch.optim classes, not DeepSpeed's
        raise fail(path, value, f"{refused}; supported types: {supported}")
    if name in UNSUPPORTED_OPTIMIZER_TYPES:
        raise fail(
            path,
            value,
            f"DeepSpeed's {value} optimizer is not implemented by zerostep; supported types: {supported}",
        )
    hint = did_you_mean(name, OPTIMIZER_TYPES)
    raise fail(
        path,
        value,
        "unknown optimizer type"
        + (f"; did you mean {hint!r}?" if hint else "")
        + f" (supported, case-insensitive: {supported})",
    )


# The Hugging Face integration writes "auto" for these; the optimizer's own default is DeepSpeed's too.
_OPTIMIZER_AUTO_TO_DEFAULT = ("betas", "eps", "weight_decay")


def parse_optimizer(block: Block | None) -> OptimizerConfig | None:
    if block is None:
        return None
    if "type" not in block.raw:
        raise fail(block.path, block.raw, 'needs a "type" (e.g. "AdamW") and optional "params"')
    kind = block.take("type", "", _optimizer_type)
    params = _params(block)
    legacy = block.take("legacy_fusion", False, boolean)
    if legacy:
        warn(
            f"{block.key_path('legacy_fusion')} = true has no effect in zerostep (a DeepSpeed fp16 "
            "optimizer-wrapper switch)"
        )
    block.finish()
    path = block.key_path("params")
    if "max_grad_norm" in params:
        raise fail(
            f"{path}.max_grad_norm",
            params["max_grad_norm"],
            "not an optimizer parameter in DeepSpeed or zerostep: use the top-level "
            '"gradient_clipping" instead',
        )
    for key in list(params):
        if params[key] != "auto":
            continue
        if key in _OPTIMIZER_AUTO_TO_DEFAULT:
            del params[key]  # the optimizer's default applies
            block.ctx.sources[f"{path}.{key}"] = AUTO
        else:
            block.ctx.unresolved(f"{path}.{key}")
    if "lr" in params and params["lr"] != "auto":
        number(f"{path}.lr", params["lr"], minimum=0.0)
    _numbers_in_float32_range(path, params)
    if kind in NATIVE_OPTIMIZER_TYPES and "auto" not in params.values():
        # Build it once, as initialize() will: every param's kind and range is checked here, so a
        # config that parses also builds (unresolved "auto"s are reported together at the end).
        # The per-parameter types (Muon, mup's, torch.optim's) need the model to be built.
        from_config({"type": kind, "params": params})
    _record_params(block, path, params)
    return OptimizerConfig(type=kind, params=freeze(params))


# --- scheduler ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerConfig:
    type: str  # DeepSpeed's class name, one of zerostep.optim.registry.SCHEDULER_TYPES
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


_LR = "lr"  # a learning rate: a number >= 0 (or a list holding one)
_RATE = "rate"  # a number >= 0: a negative decay or growth rate drives the lr (or beta1) through 0
_RATIO = "ratio"  # a fraction of the optimizer's lr, >= 0
_MOM = "mom"  # a beta1 the schedule writes into the optimizer: in [0, 1) as the optimizer's betas
_STEPS = "steps"  # a positive step count
_COUNT = "count"  # an integer >= 0
_LAST = "last"  # last_batch_iteration: -1 only, zerostep resumes a schedule from the checkpoint's step
_BOOL = "bool"
_WARMUP_TYPE = "warmup_type"
_WARMUP = {
    "warmup_min_lr": _LR,
    "warmup_max_lr": _LR,
    "warmup_num_steps": _STEPS,
    "warmup_type": _WARMUP_TYPE,
    "last_batch_iteration": _LAST,
}
# Each schedule's keyword arguments in DeepSpeed 0.19's lr_schedules.py, and the required ones.
SCHEDULER_PARAMS: dict[str, dict[str, str]] = {
    "WarmupLR": _WARMUP,
    "WarmupDecayLR": {**_WARMUP, "total_num_steps": _STEPS},
    "WarmupCosineLR": {
        "total_num_steps": _STEPS,
        "warmup_min_ratio": _RATIO,
        "warmup_num_steps": _STEPS,
        "cos_min_ratio": _RATIO,
        "warmup_type": _WARMUP_TYPE,
        "last_batch_iteration": _LAST,
    },
    "OneCycle": {
        "cycle_min_lr": _LR,
        "cycle_max_lr": _LR,
        "decay_lr_rate": _RATE,
        "cycle_first_step_size": _STEPS,
        "cycle_second_step_size": _STEPS,
        "cycle_first_stair_count": _COUNT,
        "cycle_second_stair_count": _COUNT,
        "decay_step_size": _COUNT,
        "cycle_momentum": _BOOL,
        "cycle_min_mom": _MOM,
        "cycle_max_mom": _MOM,
        "decay_mom_rate": _RATE,
        "last_batch_iteration": _LAST,
    },
    "LRRangeTest": {
        "lr_range_test_min_lr": _LR,
        "lr_range_test_step_size": _STEPS,
        "lr_range_test_step_rate": _RATE,
        "lr_range_test_staircase": _BOOL,
        "last_batch_iteration": _LAST,
    },
}
REQUIRED_SCHEDULER_PARAMS = {
    "WarmupDecayLR": ("total_num_steps",),
    "WarmupCosineLR": ("total_num_steps",),
    "OneCycle": ("cycle_min_lr", "cycle_max_lr"),
}


def _scheduler_type(path: str, value: Any) -> str:
    name = text(path, value)
    for canonical in SCHEDULER_TYPES:
        if name.lower() == canonical.lower():
            return canonical
    hint = did_you_mean(name, SCHEDULER_TYPES)
    raise fail(
        path,
        value,
        "unknown scheduler type"
        + (f"; did you mean {hint!r}?" if hint else "")
        + f" (supported, case-insensitive: {', '.join(SCHEDULER_TYPES)})",
    )


def _check_param(path: str, value: Any, kind: str) -> Any:
    """The value as the schedule reads it (an integral float as an int, a one-lr list as its lr)."""
    if kind == _LR:
        if isinstance(value, (list, tuple)):
            # DeepSpeed takes one lr per parameter group; zerostep's schedule is one for all groups.
            if len(value) != 1:
                raise fail(
                    path,
                    value,
                    "must be one learning rate (a number, or a list holding one): "
                    "zerostep drives every parameter group with one schedule",
                )
            value = value[0]
        return number(path, value, minimum=0.0)
    if kind in (_RATE, _RATIO):
        return number(path, value, minimum=0.0)
    if kind == _MOM:
        result = number(path, value, minimum=0.0)
        if result >= 1.0:
            raise fail(path, value, "must be in [0, 1): it becomes the optimizer's beta1")
        return result
    if kind == _STEPS:
        return integer(path, value, minimum=1)
    if kind == _COUNT:
        return integer(path, value, minimum=0)
    if kind == _LAST:
        if integer(path, value) != -1:
            raise fail(
                path, value, "only -1 is accepted: zerostep resumes a schedule from the checkpoint's step"
            )
        return -1
    if kind == _BOOL:
        return boolean(path, value)
    if kind == _WARMUP_TYPE:
        return choice(("log", "linear"), case_insensitive=False)(path, value)
    raise AssertionError(f"unknown scheduler parameter kind {kind!r}")


def parse_scheduler(block: Block | None, optimizer: OptimizerConfig | None) -> SchedulerConfig | None:
    if block is None:
        return None
    if "type" not in block.raw:
        raise fail(block.path, block.raw, 'needs a "type" (e.g. "WarmupLR") and optional "params"')
    kind = block.take("type", "", _scheduler_type)
    params = _params(block)
    block.finish()
    path = block.key_path("params")
    if not kind:  # "type": "auto", noted as unresolved: reported with the other "auto"s at the end
        return SchedulerConfig(type=kind, params=freeze(params))
    known = SCHEDULER_PARAMS[kind]
    for key in list(params):
        if key not in known:
            hint = did_you_mean(key, list(known))
            raise fail(
                f"{path}.{key}",
                params[key],
                f"not a {kind} parameter"
                + (f"; did you mean {hint!r}?" if hint else f" (accepted: {', '.join(known)})"),
            )
        if params[key] == "auto":
            _resolve_auto(params, key, optimizer, path, block)
        else:
            params[key] = _check_param(f"{path}.{key}", params[key], known[key])
    for key in REQUIRED_SCHEDULER_PARAMS.get(kind, ()):
        if key not in params:
            raise ConfigError(f"{path}.{key}: required by {kind} (DeepSpeed has no default for it)")
    _record_params(block, path, params)
    return SchedulerConfig(type=kind, params=freeze(params))


def _resolve_auto(
    params: dict[str, Any], key: str, optimizer: OptimizerConfig | None, path: str, block: Block
) -> None:
    """Fill an "auto" scheduler parameter as the Hugging Face integration would, where zerostep can."""
    lr = None if optimizer is None else optimizer.params.get("lr")
    if key == "warmup_min_lr":
        params[key] = 0.0  # what HF writes, and DeepSpeed's default
    elif key == "warmup_max_lr" and isinstance(lr, (int, float)) and not isinstance(lr, bool):
        params[key] = lr  # HF writes the optimizer's learning rate
    else:
        block.ctx.unresolved(f"{path}.{key}")
        return
    block.ctx.sources[f"{path}.{key}"] = AUTO


# --- checkpoint --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointConfig:
    tag_validation: str = "Warn"  # "Warn", "Ignore" or "Fail"
    load_universal: bool = False
    use_node_local_storage: bool = False


def parse_checkpoint(block: Block | None) -> CheckpointConfig:
    if block is None:
        return CheckpointConfig()
    d = CheckpointConfig()
    config = CheckpointConfig(
        tag_validation=block.take("tag_validation", d.tag_validation, choice(("Warn", "Ignore", "Fail"))),
        load_universal=block.take("load_universal", d.load_universal, boolean),
        use_node_local_storage=block.take("use_node_local_storage", d.use_node_local_storage, boolean),
    )
    if not block.take("checkpoint_serialization", True, boolean):
        warn(f"{block.key_path('checkpoint_serialization')} = false has no effect: zerostep writes msgpack")
    writer = block.take("writer", None, optional(lambda path, value: value))
    if writer is not None:
        raise fail(
            block.key_path("writer"),
            writer,
            "DeepSpeed's FastPersist checkpoint writer is not "
            "implemented by zerostep (it writes msgpack shards itself); remove the key",
        )
    parallel = block.child("parallel_write")
    if parallel is not None:
        if parallel.take("pipeline_stage", False, boolean):
            warn(
                f"{parallel.key_path('pipeline_stage')} = true has no effect: zerostep has no pipeline stages"
            )
        parallel.finish()
    block.finish()
    return config


# --- monitors ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorBoardConfig:
    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


@dataclass(frozen=True)
class CSVMonitorConfig:
    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = False
    group: str | None = None
    team: str | None = None
    project: str = "deepspeed"


def parse_file_monitor(block: Block | None, cls: type) -> Any:
    """``tensorboard`` or ``csv_monitor``: the same three keys."""
    if block is None:
        return cls()
    d = cls()
    config = cls(
        enabled=block.take("enabled", d.enabled, boolean),
        output_path=block.take("output_path", d.output_path, text),
        job_name=block.take("job_name", d.job_name, text),
    )
    block.finish()
    return config


def parse_wandb(block: Block | None) -> WandbConfig:
    if block is None:
        return WandbConfig()
    d = WandbConfig()
    config = WandbConfig(
        enabled=block.take("enabled", d.enabled, boolean),
        group=block.take("group", d.group, optional(text)),
        team=block.take("team", d.team, optional(text)),
        project=block.take("project", d.project, text),
    )
    block.finish()
    return config
