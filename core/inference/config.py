"""``init_inference``'s configuration: DeepSpeed's ``DeepSpeedInferenceConfig`` keys, checked.

DeepSpeed merges a config (dict or JSON path) with keyword arguments (kwargs win; a key given both ways
with different values is an error) and validates it with ``extra="forbid"``. The same happens here, into
a frozen ``InferenceConfig``. Each DeepSpeed key is in one of two sets:

- ``_ACTED_ON``: keys this engine implements (dtype, tensor_parallel/mp_size, injection_policy,
  replace_with_kernel_inject, enable_cuda_graph, checkpoint, max_out_tokens, quant, keep_module_on_host,
  return_tuple);
- ``_NO_EFFECT``: keys that configure DeepSpeed's own CUDA kernels, MoE inference or checkpoint resharding
  tools; given with a value other than DeepSpeed's default they warn that they have no effect here.

Any other key is an error naming it. Defaults are DeepSpeed's (``dtype`` float16, ``max_out_tokens`` 1024).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import torch

from zerostep.errors import ConfigError

# DeepSpeed's DtypeEnum spellings (deepspeed/inference/config.py)
_DTYPES: dict[str, torch.dtype] = {
    **dict.fromkeys(("torch.float16", "fp16", "float16", "half"), torch.float16),
    **dict.fromkeys(("torch.float32", "fp32", "float32", "float"), torch.float32),
    **dict.fromkeys(("torch.bfloat16", "bf16", "bfloat16", "bfloat"), torch.bfloat16),
    **dict.fromkeys(("torch.int8", "int8"), torch.int8),
}

_ALIASES = {
    "kernel_inject": "replace_with_kernel_inject",
    "tp": "tensor_parallel",
    "max_tokens": "max_out_tokens",
}

# key -> DeepSpeed's default; a different value warns that the key has no effect in zerostep
_NO_EFFECT: dict[str, Any] = {
    "use_triton": False,
    "triton_autotune": False,
    "zero": {},
    "triangular_masking": True,
    "tm": True,
    "moe": {},
    "set_empty_params": False,
    "save_mp_checkpoint_path": None,
    "checkpoint_config": {},
    "ckpt_config": {},
    "base_dir": "",
    "training_mp_size": 1,
    "replace_method": "auto",
    "injection_dict": None,
    "injection_policy_tuple": None,
    "config": None,
    "args": None,
    "min_out_tokens": 1,
    "min_tokens": 1,
    "transposed_mode": False,
    "mpu": None,
    "ep_size": 1,
    "ep_group": None,
    "ep_mp_group": None,
    "expert_group": None,
    "expert_mp_group": None,
    "moe_experts": [1],
    "moe_type": "standard",
}

_ACTED_ON = {
    "dtype",
    "tensor_parallel",
    "mp_size",
    "replace_with_kernel_inject",
    "enable_cuda_graph",
    "checkpoint",
    "max_out_tokens",
    "quant",
    "keep_module_on_host",
    "return_tuple",
    "injection_policy",
}

_TP_KEYS = {"enabled", "tp_size", "tp_grain_size", "mpu", "tp_group"}
_QUANT_KEYS = {"enabled", "activation", "weight", "qkv"}
_WEIGHT_QUANT_KEYS = {
    "enabled",
    "num_bits",
    "q_type",
    "q_groups",
    "quantized_initialization",
    "post_init_quant",
}


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    dtype: torch.dtype = torch.float16  # the compute dtype; int8 -> weight-only int8 in the module's dtype
    tp_size: int = 1
    kernel_inject: bool = False  # zerostep: the forward compiled with torch.compile
    enable_cuda_graph: bool = False  # zerostep: torch.compile(mode="reduce-overhead") on CUDA
    checkpoint: str | None = None  # a zerostep checkpoint directory or a .safetensors/.pt/.bin file
    max_out_tokens: int = 1024  # prompt + new tokens; for zerostep's GPT the KV cache's length too
    int8_weights: bool = False  # nn.Linear weights int8, per-output-channel symmetric scales
    keep_module_on_host: bool = False
    # DeepSpeed's injection_policy: {block class or class name: row-parallel linear paths in the block}
    injection_policy: dict | None = None


def _load(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            loaded = json.load(f)
        if not isinstance(loaded, dict):
            raise ConfigError(f"init_inference config {os.fspath(config)!r}: expected a JSON object")
        return loaded
    if isinstance(config, dict):
        return dict(config)
    raise ConfigError(
        f"init_inference: 'config' must be a dict or a JSON file path, got {type(config).__name__}"
    )


def merge(config: Any, kwargs: dict) -> dict:
    """DeepSpeed's merge: the config, then kwargs; a key in both with different values is an error."""
    merged = _load(config)
    for key in set(merged) & set(kwargs):
        if merged[key] != kwargs[key]:
            raise ConfigError(
                f"init_inference: conflicting '{key}' in config ({merged[key]!r}) "
                f"and kwargs ({kwargs[key]!r})"
            )
    merged.update(kwargs)
    for alias, name in _ALIASES.items():
        if alias in merged:
            if name in merged and merged[name] != merged[alias]:
                raise ConfigError(
                    f"init_inference: '{alias}' and '{name}' are the same key with different values"
                )
            merged[name] = merged.pop(alias)
    return merged


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ConfigError(f"init_inference: dtype {value} is not one of float16, bfloat16, float32, int8")
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ConfigError(
        f"init_inference: dtype {value!r} is not a valid dtype (e.g. torch.float16, 'bf16', 'fp32')"
    )


def _check_keys(block: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(block, dict):
        raise ConfigError(f"init_inference: '{where}' must be a dict, got {type(block).__name__}")
    unknown = sorted(set(block) - allowed)
    if unknown:
        raise ConfigError(
            f"init_inference: unknown key(s) {unknown} in '{where}' (allowed: {sorted(allowed)})"
        )
    return block


def _tp_size(merged: dict) -> int:
    tp = _check_keys(merged.get("tensor_parallel", {}), _TP_KEYS, "tensor_parallel")
    size = int(tp.get("tp_size", 1)) if tp.get("enabled", True) else 1
    if "mp_size" in merged:  # DeepSpeed's deprecated spelling of tensor_parallel.tp_size
        mp = int(merged["mp_size"])
        if "tp_size" in tp and mp != size:
            raise ConfigError(f"init_inference: mp_size={mp} and tensor_parallel.tp_size={size} disagree")
        size = mp
    for key in ("mpu", "tp_group"):
        if tp.get(key) is not None:
            raise ConfigError(f"init_inference: tensor_parallel.{key} is not supported; pass tp_size only")
    if tp.get("tp_grain_size", 64) != 64:
        warnings.warn("init_inference: tensor_parallel.tp_grain_size has no effect in zerostep", stacklevel=3)
    if size < 1:
        raise ConfigError(f"init_inference: tp_size must be >= 1, got {size}")
    return size


def _int8_weights(merged: dict, dtype: torch.dtype) -> bool:
    """True when weights are to be int8: ``dtype=torch.int8`` (DeepSpeed's spelling) or an explicit
    ``quant`` block whose weight part is enabled. DeepSpeed's ``quant`` default is an (unused) enabled
    block, so only a ``quant`` the user gives turns quantization on."""
    if "quant" not in merged:
        return dtype == torch.int8
    quant = _check_keys(merged["quant"], _QUANT_KEYS, "quant")
    if not quant.get("enabled", True):
        return dtype == torch.int8
    weight = _check_keys(quant.get("weight", {}), _WEIGHT_QUANT_KEYS, "quant.weight")
    if "activation" in quant and _check_keys(
        quant["activation"], {"enabled", "num_bits", "q_type", "q_groups"}, "quant.activation"
    ).get("enabled", True):
        warnings.warn(
            "init_inference: quant.activation has no effect: activations stay floating point "
            "(weight-only int8)",
            stacklevel=3,
        )
    if "qkv" in quant:
        warnings.warn("init_inference: quant.qkv has no effect in zerostep", stacklevel=3)
    if not weight.get("enabled", True):
        return dtype == torch.int8
    bits = int(weight.get("num_bits", 8))
    if bits != 8:
        raise ConfigError(f"init_inference: quant.weight.num_bits={bits}: only 8-bit weights are supported")
    if weight.get("q_type", "symmetric") not in ("symmetric", "sym"):
        raise ConfigError(
            f"init_inference: quant.weight.q_type={weight['q_type']!r}: only symmetric is supported"
        )
    if int(weight.get("q_groups", 1)) != 1:
        warnings.warn(
            "init_inference: quant.weight.q_groups has no effect: scales are per output channel, "
            "finer than any grouping",
            stacklevel=3,
        )
    for key in ("quantized_initialization", "post_init_quant"):
        if weight.get(key):
            warnings.warn(
                f"init_inference: quant.weight.{key} has no effect: every nn.Linear is quantized "
                "after loading",
                stacklevel=3,
            )
    return True


def _checkpoint(value: Any) -> str | None:
    if value is None or isinstance(value, (str, os.PathLike)):
        return None if value is None else os.fspath(value)
    raise ConfigError(
        "init_inference: checkpoint must be a path (a zerostep checkpoint directory or a "
        f".safetensors/.pt/.bin file); DeepSpeed's checkpoint-description dicts are not supported, "
        f"got {type(value).__name__}"
    )


def _injection_policy(value: Any, tp_size: int) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise ConfigError(
            "init_inference: injection_policy must be a non-empty dict {BlockClass: ('attn.c_proj', ...)}, "
            f"got {value!r}"
        )
    policy = {}
    for key, names in value.items():
        names = (names,) if isinstance(names, str) else names
        if (
            not (isinstance(key, (str, type)))
            or not isinstance(names, (tuple, list))
            or not all(isinstance(n, str) for n in names)
        ):
            raise ConfigError(
                "init_inference: injection_policy maps a block class (or its name) to the names of its "
                f"row-parallel linears, got {key!r}: {names!r}"
            )
        policy[key] = tuple(names)
    if tp_size == 1:
        warnings.warn("init_inference: injection_policy has no effect with tp_size 1", stacklevel=3)
    return policy


def parse(config: Any = None, **kwargs: Any) -> InferenceConfig:
    """``init_inference(model, config, **kwargs)``'s configuration, merged and checked."""
    merged = merge(config, kwargs)
    unknown = sorted(set(merged) - _ACTED_ON - set(_NO_EFFECT))
    if unknown:
        raise ConfigError(f"init_inference: unknown config key(s) {unknown}")
    for key, default in _NO_EFFECT.items():
        if key in merged and merged[key] != default and not (key == "moe" and merged[key] is False):
            warnings.warn(
                f"init_inference: '{key}' has no effect in zerostep (DeepSpeed-kernel option)", stacklevel=2
            )
    if merged.get("return_tuple", True) is not True:
        warnings.warn(
            "init_inference: return_tuple has no effect: the module's own outputs are returned", stacklevel=2
        )
    dtype = _dtype(merged.get("dtype", torch.float16))
    max_out = int(merged.get("max_out_tokens", 1024))
    if max_out <= 0:
        raise ConfigError(f"init_inference: max_out_tokens must be > 0, got {max_out}")
    tp_size = _tp_size(merged)
    return InferenceConfig(
        dtype=dtype,
        tp_size=tp_size,
        kernel_inject=bool(merged.get("replace_with_kernel_inject", False)),
        enable_cuda_graph=bool(merged.get("enable_cuda_graph", False)),
        checkpoint=_checkpoint(merged.get("checkpoint")),
        max_out_tokens=max_out,
        int8_weights=_int8_weights(merged, dtype),
        keep_module_on_host=bool(merged.get("keep_module_on_host", False)),
        injection_policy=_injection_policy(merged.get("injection_policy"), tp_size),
    )
