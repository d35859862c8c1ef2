"""DeepSpeed's LR schedules (``deepspeed/runtime/lr_schedules.py``, 0.19) as pure functions of the step.

``lr_schedule(block, base_lr)(it)`` is the lr DeepSpeed's scheduler holds after ``step(it)``, where
``it`` is its ``last_batch_iteration``; ``it = -1`` is the value set at construction. The engine
advances the schedule after each applied update, so update ``k`` (1-based) uses ``f(k - 1)``.

``f`` takes a python int (returns a float) or an integer/float 0-d tensor (returns a 0-d fp32
tensor computed with torch ops in fp64): the same formula runs on either, written once over a
small math namespace, and the tensor form traces in ``torch.compile`` without per-step recompiles.
Branches become ``where``; arguments that only a discarded branch would see are clamped so neither
form raises or produces inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from zerostep.errors import ConfigError
from zerostep.optim.config import block_parts
from zerostep.optim.registry import SCHEDULER_TYPES

Step = int | torch.Tensor
Schedule = Callable[[Step], Any]
_REQUIRED = object()


class _PyMath:
    log, cos, floor = math.log, math.cos, math.floor
    minimum, maximum = min, max

    @staticmethod
    def where(cond: bool, a: float, b: float) -> float:
        return a if cond else b

    @staticmethod
    def mod(a: float, b: float) -> float:
        return a % b


class _TorchMath:
    log, cos, floor = torch.log, torch.cos, torch.floor
    where, mod = torch.where, torch.remainder

    @staticmethod
    def minimum(a: Any, b: Any) -> torch.Tensor:
        return torch.clamp(a, max=b) if isinstance(a, torch.Tensor) else torch.clamp(b, max=a)

    @staticmethod
    def maximum(a: Any, b: Any) -> torch.Tensor:
        return torch.clamp(a, min=b) if isinstance(a, torch.Tensor) else torch.clamp(b, min=a)


def _evaluate(formula: Callable[[Any, Any], Any]) -> Schedule:
    """Wrap ``formula(x, math_namespace)`` to accept python ints or 0-d tensors."""

    def schedule(it: Step) -> Any:
        if isinstance(it, torch.Tensor):
            x = it.to(torch.float64)
            value = formula(x, _TorchMath)
            value = value if isinstance(value, torch.Tensor) else torch.full_like(x, value)
            return value.to(torch.float32)
        return float(formula(float(it), _PyMath))

    return schedule


def _warmup_gamma(x: Any, M: Any, num_steps: int, warmup_type: str) -> Any:
    """Warmup fraction in [0, 1) for 0 <= x < num_steps: log(x + 1) / log(W) or x / W."""
    if warmup_type == "log":
        return M.log(M.maximum(x + 1, 1.0)) / math.log(num_steps)
    return x / num_steps


def _warmup_lr(p: dict[str, Any], base_lr: float, decay: bool) -> Schedule:
    lo = float(p["warmup_min_lr"])
    hi = base_lr if p["warmup_max_lr"] is None else float(p["warmup_max_lr"])
    w = max(2, p["warmup_num_steps"])
    total = p.get("total_num_steps")

    def formula(x: Any, M: Any) -> Any:
        after = M.maximum(0.0, (total - x) / max(1.0, total - w)) if decay else 1.0
        gamma = M.where(x < w, _warmup_gamma(x, M, w, p["warmup_type"]), after)
        return M.where(x < 0, lo, lo + (hi - lo) * gamma)

    return _evaluate(formula)


def _warmup_cosine_lr(p: dict[str, Any], base_lr: float) -> Schedule:
    wmr, cmr = float(p["warmup_min_ratio"]), float(p["cos_min_ratio"])
    w = max(2, p["warmup_num_steps"])
    total = p["total_num_steps"]

    def formula(x: Any, M: Any) -> Any:
        warm = wmr + _warmup_gamma(x, M, w, p["warmup_type"]) * (1 - wmr)
        progress = M.minimum(1.0, M.maximum(x - w + 1, 0.0) / max(1, total - w))  # clamped at the end
        cosine = M.maximum(0.0, cmr + (1 - cmr) * (1 + M.cos(math.pi * progress)) / 2)
        # Before the first step DeepSpeed's WarmupCosineLR sets lr 0, whatever warmup_min_ratio is.
        return M.where(x < 0, 0.0, base_lr * M.where(x < w, warm, cosine))

    return _evaluate(formula)


def _one_cycle_scale(x: Any, M: Any, p: dict[str, Any]) -> Any:
    """Position in the triangular cycle, 0 at the ends and 1 at the peak (DeepSpeed's scale factor)."""
    first = float(p["cycle_first_step_size"])
    second = first if p["cycle_second_step_size"] is None else float(p["cycle_second_step_size"])
    total = first + second
    ratio = first / total
    bi = x + 1
    pos = 1.0 + bi / total - M.floor(1 + bi / total)
    rising = pos <= ratio
    scale = M.where(rising, pos / ratio, (pos - 1) / (ratio - 1))
    c1 = p["cycle_first_stair_count"]
    c2 = c1 if p["cycle_second_stair_count"] is None else p["cycle_second_stair_count"]
    if c1 > 0 or c2 > 0:
        # Stairs quantise from the integer offset in the cycle, with the rising/falling half's count.
        count = M.where(rising, float(c1), float(c2))
        offset = M.mod(bi, total)
        frac = M.where(offset <= first, offset / first, (total - offset) / second)
        stairs = M.floor(frac * count) / M.maximum(count, 1.0)
        scale = M.where(count > 0, stairs, scale)
    return scale


def _one_cycle(p: dict[str, Any], momentum: bool) -> Schedule:
    first = float(p["cycle_first_step_size"])
    total = first + (first if p["cycle_second_step_size"] is None else float(p["cycle_second_step_size"]))
    dss = float(p["decay_step_size"])
    if momentum:
        lo, hi, rate = float(p["cycle_min_mom"]), float(p["cycle_max_mom"]), float(p["decay_mom_rate"])
    else:
        lo, hi, rate = float(p["cycle_min_lr"]), float(p["cycle_max_lr"]), float(p["decay_lr_rate"])
    skip_decay = math.isclose(dss, 0) or math.isclose(rate, 0)

    def formula(x: Any, M: Any) -> Any:
        scale = _one_cycle_scale(x, M, p)
        interval = M.maximum(x - total + 1, 0.0) / (dss if dss else 1.0)
        if momentum:  # momentum mirrors lr; after the cycle it grows from the max by the decay rate
            cycle = hi - (hi - lo) * scale
            decayed = hi if skip_decay else hi * (1 + rate * interval)
            # Construction sets beta1 to cycle_min_mom (the first step's value), not the cycle's.
            return M.where(x < 0, lo, M.where(x < total, cycle, decayed))
        cycle = lo + (hi - lo) * scale
        decayed = lo if skip_decay else lo / (1 + rate * interval)
        return M.where(x < total, cycle, decayed)

    return _evaluate(formula)


def _lr_range_test(p: dict[str, Any]) -> Schedule:
    lo = float(p["lr_range_test_min_lr"])
    size, rate = p["lr_range_test_step_size"], p["lr_range_test_step_rate"]

    def formula(x: Any, M: Any) -> Any:
        interval = (x + 1) / size
        if p["lr_range_test_staircase"]:
            interval = M.floor(interval)
        return lo * (1 + rate * interval)

    return _evaluate(formula)


_WARMUP = dict(warmup_min_lr=0.0, warmup_max_lr=None, warmup_num_steps=1000, warmup_type="log")
_SCHEMAS: dict[str, dict[str, Any]] = {
    "warmuplr": _WARMUP,
    "warmupdecaylr": {**_WARMUP, "warmup_max_lr": 0.001, "total_num_steps": _REQUIRED},
    "warmupcosinelr": dict(total_num_steps=_REQUIRED, warmup_min_ratio=0.0, warmup_num_steps=1000,
                           cos_min_ratio=0.0001, warmup_type="log"),
    "onecycle": dict(cycle_min_lr=_REQUIRED, cycle_max_lr=_REQUIRED, decay_lr_rate=0.0,
                     cycle_first_step_size=2000, cycle_second_step_size=None, cycle_first_stair_count=0,
                     cycle_second_stair_count=None, decay_step_size=0, cycle_momentum=True,
                     cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0.0),
    "lrrangetest": dict(lr_range_test_min_lr=1e-3, lr_range_test_step_size=2000, lr_range_test_step_rate=1.0,
                        lr_range_test_staircase=False),
}
_POSITIVE_INTS = (
    "warmup_num_steps", "cycle_first_step_size", "cycle_second_step_size", "lr_range_test_step_size",
)


def _parse(block: Any) -> tuple[str, dict[str, Any]] | None:
    """(lower-cased type, params with defaults) of a scheduler block, or None for no schedule."""
    if block is None:
        return None
    kind, params = block_parts(block, "scheduler")
    if kind is None:
        raise ConfigError(f"scheduler.type: missing; supported types are {list(SCHEDULER_TYPES)}")
    name = kind.lower()
    if name not in _SCHEMAS:
        raise ConfigError(f"scheduler.type: {kind!r} is not supported; supported types are "
                          f"{list(SCHEDULER_TYPES)}")
    schema = _SCHEMAS[name]
    if params.get("last_batch_iteration", -1) != -1:
        raise ConfigError("scheduler.params.last_batch_iteration: only -1 is accepted; zerostep resumes a "
                          "schedule from the checkpoint's step")
    params.pop("last_batch_iteration", None)
    unknown = sorted(set(params) - set(schema))
    if unknown:
        raise ConfigError(f"scheduler.params: unknown key(s) {unknown} for {kind!r}; accepted keys are "
                          f"{sorted(schema)}")
    merged = {**schema, **params}
    for key, value in merged.items():
        if value is _REQUIRED:
            raise ConfigError(f"scheduler.params.{key}: required by {kind!r}")
        if key in _POSITIVE_INTS and value is not None and (type(value) is not int or value <= 0):
            raise ConfigError(f"scheduler.params.{key}: {value!r} is invalid; it must be a positive integer")
        if key == "warmup_type" and value not in ("log", "linear"):
            raise ConfigError(f"scheduler.params.warmup_type: {value!r} is invalid; it must be 'log' or "
                              "'linear'")
        numeric = key not in ("warmup_type", "cycle_momentum", "lr_range_test_staircase")
        if numeric and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"scheduler.params.{key}: {value!r} is invalid; it must be a number")
    return name, merged


def lr_schedule(block: Any, base_lr: float) -> Schedule:
    """``f(it)``: the lr after DeepSpeed's scheduler ``step(it)``; ``f(-1)`` is the value at construction.

    ``block`` is a DeepSpeed ``"scheduler"`` block (dict or object with ``.type``/``.params``) or
    None for a constant ``base_lr``. ``base_lr`` (the optimizer's lr) is WarmupLR's default
    ``warmup_max_lr`` and WarmupCosineLR's peak.
    """
    parsed = _parse(block)
    if parsed is None:
        return _evaluate(lambda x, M: float(base_lr))
    name, p = parsed
    if name in ("warmuplr", "warmupdecaylr"):
        return _warmup_lr(p, float(base_lr), decay=name == "warmupdecaylr")
    if name == "warmupcosinelr":
        return _warmup_cosine_lr(p, float(base_lr))
    if name == "onecycle":
        return _one_cycle(p, momentum=False)
    return _lr_range_test(p)


def momentum_schedule(block: Any, optimizer: Any = None) -> Schedule | None:
    """``f(it)`` giving beta1 under OneCycle with ``cycle_momentum`` (else None), like ``lr_schedule``.

    DeepSpeed writes ``(beta1, 0.99)`` into the optimizer's betas, so a caller that follows it also
    passes ``beta2=ONE_CYCLE_BETA2``. Pass ``optimizer`` to get None for optimizers without betas
    (SGD, Adagrad), for which DeepSpeed disables the momentum cycle.
    """
    parsed = _parse(block)
    if parsed is None or parsed[0] != "onecycle" or not parsed[1]["cycle_momentum"]:
        return None
    if optimizer is not None and not getattr(optimizer, "cycles_momentum", True):
        return None
    return _one_cycle(parsed[1], momentum=True)


ONE_CYCLE_BETA2 = 0.99  # DeepSpeed's OneCycle pins beta2 while it cycles beta1
