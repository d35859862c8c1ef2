"""The ``fp16``, ``bf16`` (legacy ``bfloat16``) and ``data_types`` blocks, with DeepSpeed 0.19's defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from zerostep.core.config.values import FLOAT32_MAX, Block, boolean, fail, integer, optional

MAX_FLOAT32_INT = int(FLOAT32_MAX)  # the largest integer a float32 holds


@dataclass(frozen=True)
class FP16Config:
    enabled: bool = False
    auto_cast: bool = False
    loss_scale: float = 0.0  # 0 selects dynamic loss scaling; > 0 is a static scale
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: int = 1
    fp16_master_weights_and_grads: bool = False

    @property
    def dynamic(self) -> bool:
        return self.loss_scale == 0


@dataclass(frozen=True)
class BF16Config:
    enabled: bool = False
    immediate_grad_update: bool = False
    check_grad_overflow: bool = True
    # DeepSpeed 0.19: master weights and gradient partitions in bf16 (ZeRO stages 1-3), and optionally
    # the optimizer's moments too; zerostep needs no CPU offload for either
    bf16_master_weights_and_grads: bool = False
    bf16_optimizer_states: bool = False


@dataclass(frozen=True)
class DataTypesConfig:
    """DeepSpeed's ``data_types`` block: "fp32", "fp16", "bf16" or None (= follow the compute dtype)."""

    grad_accum_dtype: str | None = None
    param_dtype: str | None = None
    buffer_dtype: str | None = None


def _loss_scale(path: str, value: Any) -> float:
    # DeepSpeed 0.19 rejects these explicitly: pydantic would turn true into 1.0, a static scale.
    if isinstance(value, bool):
        raise fail(path, value, "must be a number, not a boolean (0 selects dynamic loss scaling)")
    if not isinstance(value, (int, float)):
        raise fail(path, value, "must be a number (0 selects dynamic loss scaling)")
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(path, value, "must be a finite number (not NaN or infinity)")
    if value < 0:
        raise fail(path, value, "must be >= 0 (0 selects dynamic loss scaling, > 0 a static scale)")
    if value > FLOAT32_MAX:
        raise fail(path, value, "must be <= 3.4e38: the scale is kept in float32")
    return float(value)


def _min_loss_scale(path: str, value: Any) -> int:
    # The scale's floor, compared with (and clamped to) the float32 scale.
    return integer(path, value, maximum=MAX_FLOAT32_INT)


def _scale_power(path: str, value: Any) -> int:
    # 2**power must be a normal, finite float32; checked first, so 1e30 gets this message too.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not -126 <= value <= 127:
        raise fail(path, value, "must be an integer in [-126, 127] (the scale is 2**initial_scale_power)")
    return integer(path, value)


def parse_fp16(block: Block | None) -> FP16Config:
    if block is None:
        return FP16Config()
    d = FP16Config()
    enabled = block.take("enabled", d.enabled, boolean)
    loss_scale = block.take("loss_scale", d.loss_scale, _loss_scale)
    config = FP16Config(
        enabled=enabled,
        auto_cast=block.take("auto_cast", d.auto_cast, boolean),
        loss_scale=loss_scale,
        initial_scale_power=block.take("initial_scale_power", d.initial_scale_power, _scale_power),
        # Both live in int64 tensors of the scaler state; integer() bounds them to int64.
        loss_scale_window=block.take("loss_scale_window", d.loss_scale_window, integer),
        hysteresis=block.take("hysteresis", d.hysteresis, integer),
        consecutive_hysteresis=block.take("consecutive_hysteresis", d.consecutive_hysteresis, boolean),
        min_loss_scale=block.take("min_loss_scale", d.min_loss_scale, _min_loss_scale),
        fp16_master_weights_and_grads=block.take(
            "fp16_master_weights_and_grads", d.fp16_master_weights_and_grads, boolean
        ),
    )
    block.finish()
    # Only a live dynamic scaler uses these (DeepSpeed checks them under the same condition):
    # the window is a modulus and the minimum the scale's floor.
    if config.enabled and config.dynamic:
        for key, minimum in (("loss_scale_window", 1), ("min_loss_scale", 1), ("hysteresis", 1)):
            value = getattr(config, key)
            if value < minimum:
                raise fail(
                    block.key_path(key),
                    value,
                    f"must be >= {minimum} when dynamic loss scaling is on (fp16.enabled with loss_scale 0)",
                )
    return config


def parse_bf16(block: Block | None) -> BF16Config:
    if block is None:
        return BF16Config()
    d = BF16Config()
    config = BF16Config(
        enabled=block.take("enabled", d.enabled, boolean),
        immediate_grad_update=block.take("immediate_grad_update", d.immediate_grad_update, boolean),
        check_grad_overflow=block.take("check_grad_overflow", d.check_grad_overflow, boolean),
        bf16_master_weights_and_grads=block.take(
            "bf16_master_weights_and_grads", d.bf16_master_weights_and_grads, boolean
        ),
        bf16_optimizer_states=block.take("bf16_optimizer_states", d.bf16_optimizer_states, boolean),
    )
    if config.bf16_optimizer_states and not config.bf16_master_weights_and_grads:
        raise fail(
            block.key_path("bf16_optimizer_states"),
            True,
            "needs bf16.bf16_master_weights_and_grads = true (DeepSpeed's rule: bf16 moments go with "
            "bf16 master weights)",
        )
    block.finish()
    return config


def check_low_precision_master(fp16: FP16Config, bf16: BF16Config, stage: int) -> None:
    """DeepSpeed's rules for the low-precision master options: the precision enabled, ZeRO stage 1-3."""
    for name, block, flag in (
        ("fp16", fp16, fp16.fp16_master_weights_and_grads),
        ("bf16", bf16, bf16.bf16_master_weights_and_grads),
    ):
        if not flag:
            continue
        key = f"{name}.{name}_master_weights_and_grads"
        if not block.enabled:
            raise fail(key, True, f"needs {name}.enabled = true")
        if stage not in (1, 2, 3):
            raise fail(
                key, True, f"needs ZeRO stage 1, 2 or 3 (zero_optimization.stage is {stage}), as in DeepSpeed"
            )


_DTYPE_NAMES = {
    "fp32": ("fp32", "float32", "float", "torch.float32"),
    "fp16": ("fp16", "float16", "half", "torch.float16"),
    "bf16": ("bf16", "bfloat16", "torch.bfloat16"),
}


def _dtype_name(path: str, value: Any) -> str:
    if isinstance(value, str):
        for canonical, spellings in _DTYPE_NAMES.items():
            if value.lower() in spellings:
                return canonical
    raise fail(path, value, "must be one of fp32, fp16, bf16 (or null)")


@dataclass(frozen=True)
class TorchAutocastConfig:
    """DeepSpeed 0.19's ``torch_autocast`` block: the forward under ``torch.autocast(dtype)``.

    ``dtype`` None is torch's default for the device (bf16 on CPU, fp16 on CUDA), as DeepSpeed leaves
    it; ``lower_precision_safe_modules`` are dotted class names (None: DeepSpeed's Linear/Conv list)."""

    enabled: bool = False
    dtype: str | None = None  # "fp16" or "bf16"
    lower_precision_safe_modules: tuple[str, ...] | None = None


def _autocast_dtype(path: str, value: Any) -> str:
    name = _dtype_name(path, value)
    if name == "fp32":
        raise fail(path, value, "must be a lower precision for torch.autocast: bf16 or fp16")
    return name


def _class_names(path: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and "." in v for v in value):
        raise fail(path, value, 'must be a list of dotted class names, e.g. ["torch.nn.Linear"]')
    return tuple(value)


def parse_torch_autocast(block: Block | None) -> TorchAutocastConfig:
    if block is None:
        return TorchAutocastConfig()
    d = TorchAutocastConfig()
    config = TorchAutocastConfig(
        enabled=block.take("enabled", d.enabled, boolean),
        dtype=block.take("dtype", d.dtype, optional(_autocast_dtype)),
        lower_precision_safe_modules=block.take(
            "lower_precision_safe_modules", d.lower_precision_safe_modules, optional(_class_names)
        ),
    )
    block.finish()
    return config


def parse_data_types(block: Block | None) -> DataTypesConfig:
    if block is None:
        return DataTypesConfig()
    dtype = optional(_dtype_name)
    config = DataTypesConfig(
        grad_accum_dtype=block.take("grad_accum_dtype", None, dtype),
        param_dtype=block.take("param_dtype", None, dtype),
        buffer_dtype=block.take("buffer_dtype", None, dtype),
    )
    block.finish()
    return config
