"""DeepSpeed's LR scheduler classes (``deepspeed.runtime.lr_schedules``) over zerostep's pure schedules.

``WarmupLR(optimizer, ...)``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle`` and ``LRRangeTest`` take
DeepSpeed's constructor arguments and behave as DeepSpeed's objects do: ``step()`` advances
``last_batch_iteration`` and writes each parameter group's lr (OneCycle also its momentum into
``betas``), ``get_lr()``, ``get_last_lr()``, ``state_dict()`` / ``load_state_dict()``. The values come from
``zerostep.optim.lr_schedule``, the same functions the functional engine evaluates, one per parameter
group (a list value gives each group its own, as DeepSpeed's ``_format_param``). The engine facade
builds one from the config's ``scheduler`` block; scripts may also build them over any torch optimizer.
"""

from __future__ import annotations

from typing import Any

from zerostep.errors import ConfigError
from zerostep.optim import lr_schedule, momentum_schedule

# DeepSpeed's constructor defaults where they differ from the config parser's, per class.
_POSITIONAL = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
    "WarmupDecayLR": ("total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
    "WarmupCosineLR": (
        "total_num_steps",
        "warmup_min_ratio",
        "warmup_num_steps",
        "cos_min_ratio",
        "warmup_type",
    ),
    "OneCycle": (
        "cycle_min_lr",
        "cycle_max_lr",
        "decay_lr_rate",
        "cycle_first_step_size",
        "cycle_second_step_size",
        "cycle_first_stair_count",
        "cycle_second_stair_count",
        "decay_step_size",
        "cycle_momentum",
        "cycle_min_mom",
        "cycle_max_mom",
        "decay_mom_rate",
    ),
    "LRRangeTest": (
        "lr_range_test_min_lr",
        "lr_range_test_step_size",
        "lr_range_test_step_rate",
        "lr_range_test_staircase",
    ),
}


def _torch_optimizer(optimizer: Any) -> Any:
    if hasattr(optimizer, "param_groups"):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and hasattr(inner, "param_groups"):
        return inner
    raise TypeError(f"{type(optimizer).__name__} has no param_groups; pass a torch optimizer")


class _DeepSpeedSchedule:
    """Shared machinery: one pure schedule per parameter group, evaluated at ``last_batch_iteration``."""

    name = ""

    def __init__(self, optimizer: Any, *args: Any, last_batch_iteration: int = -1, **params: Any) -> None:
        names = _POSITIONAL[self.name]
        if len(args) > len(names):
            raise TypeError(f"{self.name}() takes at most {len(names)} positional arguments after optimizer")
        params.update(zip(names, args))
        self.optimizer = _torch_optimizer(optimizer)
        groups = self.optimizer.param_groups
        self._lr_at, self._beta1_at = [], []
        for index, group in enumerate(groups):
            own = {k: _for_group(k, v, index, len(groups)) for k, v in params.items()}
            block = {"type": self.name, "params": own}
            try:
                self._lr_at.append(lr_schedule(block, float(group["lr"])))
                self._beta1_at.append(momentum_schedule(block) if "betas" in group else None)
            except ConfigError as err:
                raise ValueError(f"{self.name}: {err}") from None
        self.last_batch_iteration = int(last_batch_iteration)
        self._last_lr = self._write()

    def get_lr(self) -> list[float]:
        return [f(self.last_batch_iteration) for f in self._lr_at]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def step(self, last_batch_iteration: int | None = None) -> None:
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = int(last_batch_iteration)
        self._last_lr = self._write()

    def _write(self) -> list[float]:
        it = self.last_batch_iteration
        for group, lr_at, beta1_at in zip(self.optimizer.param_groups, self._lr_at, self._beta1_at):
            group["lr"] = lr_at(it)
            if beta1_at is not None:
                group["betas"] = (beta1_at(it), 0.99)  # DeepSpeed's OneCycle pins beta2
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_batch_iteration = int(state_dict["last_batch_iteration"])
        self._last_lr = self._write()


def _for_group(key: str, value: Any, index: int, count: int) -> Any:
    """A list value gives each parameter group its own (DeepSpeed's ``_format_param``)."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"expected {count} values for {key} (one per param group), got {len(value)}")
        return value[index]
    return value


class WarmupLR(_DeepSpeedSchedule):
    name = "WarmupLR"


class WarmupDecayLR(_DeepSpeedSchedule):
    name = "WarmupDecayLR"


class WarmupCosineLR(_DeepSpeedSchedule):
    name = "WarmupCosineLR"


class OneCycle(_DeepSpeedSchedule):
    name = "OneCycle"


class LRRangeTest(_DeepSpeedSchedule):
    name = "LRRangeTest"


SCHEDULERS = {
    cls.name.lower(): cls for cls in (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest)
}


def scheduler_from_config(block: Any, optimizer: Any) -> _DeepSpeedSchedule | None:
    """The scheduler object a config's ``scheduler`` block names, over ``optimizer`` (None: no block)."""
    if block is None:
        return None
    kind = block.type if hasattr(block, "type") else block.get("type")
    params = dict((block.params if hasattr(block, "params") else block.get("params")) or {})
    cls = SCHEDULERS.get(str(kind).lower())
    if cls is None:
        raise ConfigError(f"scheduler.type: {kind!r} is not one of {[c.name for c in SCHEDULERS.values()]}")
    last = int(params.pop("last_batch_iteration", -1))
    return cls(optimizer, last_batch_iteration=last, **params)
