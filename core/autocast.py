"""DeepSpeed's ``torch_autocast`` block: the model's forward under ``torch.autocast``.

With the block on, DeepSpeed runs the module's forward inside ``torch.autocast(device, dtype)`` and
leaves the parameters in whatever dtype the fp16/bf16 blocks give them: fp32 with neither block (the
usual use: fp32 weights and optimizer, autocast's per-op choice of precision in the forward), bf16 or
fp16 otherwise (then autocast still moves the ops on its fp32 list, softmax, norms and losses, to fp32).
zerostep does the same in every forward it runs: the functional ``engine.step`` (compiled or eager,
stage 3's unit-by-unit forward included), ``engine.evaluate`` and the DeepSpeed facade's ``engine(x)``.
Backward needs nothing: autograd replays each op in the dtype its forward used.

fp16 autocast over fp32 parameters still needs loss scaling, or small activation gradients flush to
zero. DeepSpeed uses a ``torch.amp.GradScaler`` with torch's defaults there; zerostep runs its own
dynamic scaler (``core/precision.py``) with the same constants: scale 2**16, halved on every overflow
(no hysteresis), doubled after 2000 clean steps. One difference: GradScaler has no floor, zerostep's
scaler stops at 1 and raises ``LossScaleError``, as it does for the fp16 block. With the fp16 block
enabled its own loss-scale settings apply.

``lower_precision_safe_modules`` names the classes whose parameters' gradients DeepSpeed all-reduces in
the autocast dtype. zerostep reduces every gradient in its parameter's dtype, so over fp32 parameters it
sends fp32 (more bytes, less rounding than DeepSpeed); the engine says so with a warning. The class names
are still checked: one that cannot be imported is an error, as in DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zerostep.core.config import Config, FP16Config
from zerostep.core.precision import DTYPES

# DeepSpeed's default lower-precision-safe classes (runtime/torch_autocast.py)
DEFAULT_SAFE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# torch.amp.GradScaler's defaults (init_scale 2**16, growth_interval 2000, backoff 0.5) in the terms of
# DeepSpeed's dynamic scaler: hysteresis 1 halves on every overflow
GRAD_SCALER_EQUIVALENT = FP16Config(
    enabled=True, loss_scale=0.0, initial_scale_power=16, loss_scale_window=2000, hysteresis=1
)


@dataclasses.dataclass(frozen=True)
class AutocastPlan:
    """Where and in which dtype the forward autocasts."""

    device_type: str  # "cpu", "cuda", ...
    dtype: torch.dtype


def autocast_plan_of(config: Config, device: torch.device) -> AutocastPlan | None:
    """The plan for ``config``'s ``torch_autocast`` block on ``device``; None when it is off. A dtype
    left unset is torch's default for the device (bf16 on CPU, fp16 on CUDA), as in DeepSpeed."""
    block = config.torch_autocast
    if not block.enabled:
        return None
    dtype = DTYPES[block.dtype] if block.dtype is not None else torch.get_autocast_dtype(device.type)
    return AutocastPlan(device_type=device.type, dtype=dtype)


def loss_scaling_of(config: Config) -> FP16Config:
    """The loss-scale settings a step uses: the fp16 block's, or GradScaler's equivalent for fp16
    autocast without that block (a disabled block, a constant scale of 1, otherwise)."""
    block = config.torch_autocast
    if not config.fp16.enabled and block.enabled and block.dtype == "fp16":
        return GRAD_SCALER_EQUIVALENT
    return config.fp16


def under_autocast(fn: Callable[..., Any], plan: AutocastPlan | None) -> Callable[..., Any]:
    """``fn`` run inside ``torch.autocast`` per ``plan`` (``fn`` itself when there is none). The
    context is entered inside the returned function so that ``torch.compile`` traces it."""
    if plan is None:
        return fn
    device_type, dtype = plan.device_type, plan.dtype

    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device_type, dtype=dtype):
            return fn(*args, **kwargs)

    autocast_forward.__wrapped__ = fn  # type: ignore[attr-defined]
    return autocast_forward


def safe_module_classes(names: tuple[str, ...] | None) -> tuple[type, ...]:
    """The classes ``torch_autocast.lower_precision_safe_modules`` names (DeepSpeed's list if None)."""
    if names is None:
        return DEFAULT_SAFE_MODULES
    classes = []
    for name in names:
        package, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(package), cls_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(
                f"torch_autocast.lower_precision_safe_modules: cannot import {name!r} ({error})"
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(
                f"torch_autocast.lower_precision_safe_modules: {name!r} is not an nn.Module class"
            )
        classes.append(cls)
    return tuple(classes)


def check_autocast_model(
    config: Config, plan: AutocastPlan | None, model: nn.Module, compute_dtype: torch.dtype
) -> None:
    """Resolve the safe-module names and warn where zerostep's gradient reduction differs from
    DeepSpeed's: the safe modules have trainable parameters and the compute dtype (the parameters'
    dtype in the engine) is wider than the autocast dtype."""
    if plan is None:
        return
    classes = safe_module_classes(config.torch_autocast.lower_precision_safe_modules)
    if compute_dtype.itemsize <= plan.dtype.itemsize:
        return
    if any(
        p.requires_grad for m in model.modules() if type(m) in classes for p in m.parameters(recurse=False)
    ):
        wide, narrow = (str(d).removeprefix("torch.") for d in (compute_dtype, plan.dtype))
        warnings.warn(
            f"torch_autocast: the gradients of lower_precision_safe_modules are all-reduced in {wide} "
            f"(their parameters' dtype), not in {narrow} as DeepSpeed does: zerostep communicates each "
            "gradient in its parameter's dtype (more bytes, less rounding)",
            stacklevel=4,
        )


_warned_outer = False


def facade_autocast(plan: AutocastPlan | None, device: torch.device) -> Any:
    """The context around the facade's ``engine(x)``, by DeepSpeed's rule for an autocast the caller
    already entered: the engine's ``torch_autocast`` settings win, and without the block autocast is
    switched off inside the engine (its fp16/bf16 blocks decide precision). None: nothing to enter."""
    global _warned_outer
    if plan is not None or not torch.is_autocast_enabled(device.type):
        return None
    if not _warned_outer:
        _warned_outer = True
        warnings.warn(
            "torch.autocast is enabled around the engine but the config has no torch_autocast block: "
            "autocast is switched off inside the engine, whose fp16/bf16 blocks decide precision (as "
            "in DeepSpeed); configure torch_autocast to autocast the model's forward",
            stacklevel=4,
        )
    return torch.autocast(device_type=device.type, enabled=False)
