"""Precision: compute dtypes and DeepSpeed's dynamic loss scaler as a pure function over tensors.

``loss_scale_update`` reproduces the ZeRO path of DeepSpeed's ``DynamicLossScaler`` (factor 2):

- overflow: if ``hysteresis == 1`` or one hysteresis step is left, the scale halves (not below
  ``min_loss_scale``; DeepSpeed raises when it is already at the minimum, here the event is counted in
  ``min_scale_overflows`` and the engine raises ``LossScaleError``); otherwise one hysteresis step is used
  up. ``last_overflow_iter`` becomes the current iteration.
- no overflow: with ``consecutive_hysteresis`` the hysteresis refills; after every ``loss_scale_window``
  stable iterations the scale doubles (and, without ``consecutive_hysteresis``, the hysteresis refills).
- ``iteration`` advances every call. A static scale (``loss_scale > 0``), bf16 and fp32 never change it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

# the config's canonical dtype names (core/config/precision.py) as torch dtypes
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class LossScaleError(RuntimeError):
    """fp16 gradients overflowed with the loss scale already at ``min_loss_scale``."""


class ScalerState(NamedTuple):
    scale: torch.Tensor  # fp32 []
    iteration: torch.Tensor  # int64 []
    last_overflow_iter: torch.Tensor  # int64 [], -1 before any overflow
    hysteresis_left: torch.Tensor  # int64 []
    min_scale_overflows: torch.Tensor  # int64 [], overflows seen at the minimum scale


def _enabled(fp16: Any) -> bool:
    return bool(fp16 is not None and getattr(fp16, "enabled", False))


def is_dynamic(fp16: Any) -> bool:
    return _enabled(fp16) and float(fp16.loss_scale) == 0.0


def loss_scale_init(fp16: Any) -> ScalerState:
    """The scaler's first state for a config's ``fp16`` block (disabled: a static scale of 1)."""
    if not _enabled(fp16):
        scale, hysteresis = 1.0, 1
    elif is_dynamic(fp16):
        scale, hysteresis = float(2.0**fp16.initial_scale_power), int(fp16.hysteresis)
    else:
        scale, hysteresis = float(fp16.loss_scale), int(getattr(fp16, "hysteresis", 1))
    return ScalerState(
        scale=torch.tensor(scale, dtype=torch.float32),
        iteration=torch.tensor(0, dtype=torch.int64),
        last_overflow_iter=torch.tensor(-1, dtype=torch.int64),
        hysteresis_left=torch.tensor(hysteresis, dtype=torch.int64),
        min_scale_overflows=torch.tensor(0, dtype=torch.int64),
    )


def loss_scale_update(state: ScalerState, overflow: bool | torch.Tensor, fp16: Any) -> ScalerState:
    """The scaler state after one step whose gradients did (``overflow``) or did not overflow. Pure."""
    overflow = torch.as_tensor(overflow, dtype=torch.bool, device=state.scale.device)
    it = state.iteration
    last = torch.where(overflow, it, state.last_overflow_iter)
    if not is_dynamic(fp16):
        return state._replace(iteration=it + 1, last_overflow_iter=last)

    hysteresis = int(fp16.hysteresis)
    window = int(fp16.loss_scale_window)
    min_scale = float(fp16.min_loss_scale)
    left = state.hysteresis_left

    # Overflow branch.
    shift = torch.ones_like(overflow) if hysteresis == 1 else left == 1
    at_min = overflow & shift & (state.scale <= min_scale)
    halved = torch.clamp(state.scale / 2, min=min_scale)
    scale_ovf = torch.where(shift & ~at_min, halved, state.scale)
    left_ovf = torch.where(shift, left, left - 1)

    # No-overflow branch; `stable` counts clean iterations since the last overflow.
    stable = it - state.last_overflow_iter - 1
    grow = (stable > 0) & (torch.remainder(stable, window) == 0)
    scale_ok = torch.where(grow, state.scale * 2, state.scale)
    if fp16.consecutive_hysteresis:
        left_ok = torch.full_like(left, hysteresis)
    else:
        left_ok = torch.where(grow, torch.full_like(left, hysteresis), left)

    return ScalerState(
        scale=torch.where(overflow, scale_ovf, scale_ok),
        iteration=it + 1,
        last_overflow_iter=last,
        hysteresis_left=torch.where(overflow, left_ovf, left_ok),
        min_scale_overflows=state.min_scale_overflows + at_min.to(torch.int64),
    )


def master_dtype_of(config: Any) -> torch.dtype:
    """The master weights' dtype: fp32, or the compute dtype with ``fp16.fp16_master_weights_and_grads``
    / ``bf16.bf16_master_weights_and_grads`` (DeepSpeed 0.19's low-precision master, ZeRO 1-3)."""
    if _enabled(getattr(config, "fp16", None)) and config.fp16.fp16_master_weights_and_grads:
        return torch.float16
    bf16 = getattr(config, "bf16", None)
    if getattr(bf16, "enabled", False) and getattr(bf16, "bf16_master_weights_and_grads", False):
        return torch.bfloat16
    return torch.float32


def optimizer_state_dtype_of(config: Any) -> torch.dtype | None:
    """bf16 with ``bf16.bf16_optimizer_states`` (the moments shaped like the master, in bf16); None:
    each optimizer's own choice (fp32 moments)."""
    bf16 = getattr(config, "bf16", None)
    if getattr(bf16, "enabled", False) and getattr(bf16, "bf16_optimizer_states", False):
        return torch.bfloat16
    return None


def compute_dtype_of(config: Any) -> torch.dtype:
    """fp16 > bf16 > fp32, from a Config's ``fp16.enabled`` and ``bf16.enabled``."""
    if _enabled(getattr(config, "fp16", None)):
        return torch.float16
    if getattr(getattr(config, "bf16", None), "enabled", False):
        return torch.bfloat16
    return torch.float32
