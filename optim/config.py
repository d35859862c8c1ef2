"""``from_config``: a DeepSpeed ``"optimizer"`` block to an ``Optimizer``, with DeepSpeed's semantics.

DeepSpeed (``engine._configure_basic_optimizer``) matches the type case-insensitively, rejects
``max_grad_norm`` (clipping is the top-level ``gradient_clipping``), pops ``adam_w_mode`` (default
true, so ``"Adam"`` is AdamW) and ``torch_adam`` for Adam/AdamW, and builds FusedAdam, FusedLamb,
FusedLion, or the torch.optim class of that name (Adagrad, SGD). Defaults are those classes' defaults.
Where DeepSpeed would fail with a ``TypeError`` on an unexpected keyword, zerostep raises a
``ConfigError`` naming the key.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from zerostep.errors import ConfigError
from zerostep.optim.adagrad import adagrad
from zerostep.optim.adam import adam
from zerostep.optim.base import Optimizer, PerLeaf
from zerostep.optim.lamb import lamb
from zerostep.optim.lion import lion
from zerostep.optim.onebit_adam import onebit_adam
from zerostep.optim.onebit_lamb import onebit_lamb
from zerostep.optim.per_parameter import per_parameter_from_config
from zerostep.optim.registry import (
    COMPRESSED_OPTIMIZER_TYPES,
    OPTIMIZER_TYPES,
    PER_PARAMETER_TYPES,
    TORCH_REFUSED_TYPES,
    UNSUPPORTED_OPTIMIZER_TYPES,
)
from zerostep.optim.sgd import sgd
from zerostep.optim.zero_one_adam import zero_one_adam

# Each type's accepted params and their defaults (DeepSpeed's FusedAdam/FusedLamb/FusedLion,
# torch.optim's Adagrad/SGD). Adam's mode flags are handled before this table is consulted.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True,
                 amsgrad=False),
    "lamb": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True,
                 eps_inside_sqrt=False, max_coeff=10.0, min_coeff=0.01, amsgrad=False),
    "adagrad": dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10),
    "sgd": dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    "lion": dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0),
    # DeepSpeed's OnebitAdam (deepspeed/runtime/fp16/onebit/adam.py, removed after 0.17)
    "onebitadam": dict(lr=1e-3, freeze_step=100000, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                       eps_inside_sqrt=False, weight_decay=0.0, amsgrad=False, cuda_aware=False,
                       comm_backend_name="nccl"),
    # DeepSpeed's ZeroOneAdam (onebit/zoadam.py) and OnebitLamb (onebit/lamb.py), removed after 0.17
    "zerooneadam": dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, eps_inside_sqrt=False,
                        weight_decay=0.0, var_freeze_step=100000, var_update_scaler=16,
                        local_step_scaler=32678, local_step_clipper=16, amsgrad=False, cuda_aware=False,
                        comm_backend_name="nccl"),
    "onebitlamb": dict(lr=1e-3, freeze_step=100000, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                       eps_inside_sqrt=False, weight_decay=0.0, max_coeff=10.0, min_coeff=0.01, amsgrad=False,
                       cuda_aware=False, comm_backend_name="nccl", coeff_beta=0.9, factor_max=4.0,
                       factor_min=0.5, factor_threshold=0.1),
}
_FACTORIES = {"adam": adam, "lamb": lamb, "adagrad": adagrad, "sgd": sgd, "lion": lion,
              "onebitadam": onebit_adam, "zerooneadam": zero_one_adam, "onebitlamb": onebit_lamb}


def block_parts(block: Any, what: str) -> tuple[str | None, dict[str, Any]]:
    """(type, params) of a config block given as a dict or an object with ``.type``/``.params``."""
    if isinstance(block, Mapping):  # other keys (e.g. DeepSpeed's legacy_fusion) are core.config's concern
        kind, params = block.get("type"), block.get("params")
    else:
        kind, params = getattr(block, "type", None), getattr(block, "params", None)
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{what}.params: {params!r} is invalid; it must be a dict")
    if kind is not None and not isinstance(kind, str):
        raise ConfigError(f"{what}.type: {kind!r} is invalid; it must be a string")
    return kind, dict(params)


def from_config(
    block: Any,
    *,
    weight_decay_mask: PerLeaf = None,
    lr_multipliers: PerLeaf = None,
    use_triton: bool | None = None,
    trust_segments: PerLeaf = None,
    norm_reduce: Any = None,
    param_pieces: PerLeaf = None,
    all_gather: Any = None,
    exchange: Any = None,
    schedule_sets_lr: bool = False,
    param_widths: Any = None,
    compressed_allreduce: Any = None,
    world_size: int = 1,
    padding: Any = None,
    segments: Any = None,
    model_parallel: PerLeaf = None,
    split_matrices: Any = None,
) -> Optimizer:
    """Build the optimizer a DeepSpeed ``"optimizer": {"type": ..., "params": {...}}`` block names.

    ``trust_segments`` and ``norm_reduce`` reach LAMB only (see ``zerostep.optim.lamb``): how a flat
    shard splits into parameters, and how partial norms are summed over ranks. ``param_pieces``,
    ``all_gather``, ``exchange``, ``schedule_sets_lr`` and ``param_widths`` reach the per-parameter
    types (Muon, mup's, torch.optim's; see ``zerostep.optim.per_parameter``). ``compressed_allreduce``,
    ``world_size`` and ``padding`` reach the compressed-communication types
    (``COMPRESSED_OPTIMIZER_TYPES``); ``segments`` (each flat leaf's parameter ranges) 1-bit LAMB.
    Under model parallelism (``zerostep.optim.model_parallel``): ``model_parallel`` (per leaf, which
    parameter segments are split) reaches LAMB and 1-bit LAMB, ``split_matrices`` Muon."""
    kind, params = block_parts(block, "optimizer")
    if kind is None:
        raise ConfigError(f"optimizer.type: missing; supported types are {list(OPTIMIZER_TYPES)}")
    name = kind.lower()
    if name in UNSUPPORTED_OPTIMIZER_TYPES and name not in TORCH_REFUSED_TYPES:
        raise ConfigError(f"optimizer.type: {kind!r} is a DeepSpeed optimizer zerostep does not implement; "
                          f"supported types are {list(OPTIMIZER_TYPES)}")
    if name not in OPTIMIZER_TYPES and name not in TORCH_REFUSED_TYPES:
        raise ConfigError(f"optimizer.type: {kind!r} is not supported; supported types are "
                          f"{list(OPTIMIZER_TYPES)}")
    if "max_grad_norm" in params:
        raise ConfigError("optimizer.params.max_grad_norm: not supported as an optimizer parameter (as in "
                          "DeepSpeed); use the top-level 'gradient_clipping' instead")
    if name in PER_PARAMETER_TYPES or name in TORCH_REFUSED_TYPES:  # the latter: torch_adapter says why not
        return per_parameter_from_config(kind, params, param_pieces=param_pieces, all_gather=all_gather,
                                         exchange=exchange,
                                         schedule_sets_lr=schedule_sets_lr, param_widths=param_widths,
                                         use_triton=use_triton, lr_multipliers=lr_multipliers,
                                         weight_decay_mask=weight_decay_mask, split_matrices=split_matrices)

    extra: dict[str, Any] = dict(weight_decay_mask=weight_decay_mask, lr_multipliers=lr_multipliers)
    base = name
    if name in ("adam", "adamw"):
        base = "adam"
        torch_adam = _flag(params, "torch_adam", False)
        adam_w_mode = _flag(params, "adam_w_mode", True) or name == "adamw"
        extra["adam_w_mode"] = adam_w_mode
        extra["use_triton"] = use_triton
        defaults = dict(_DEFAULTS["adam"])
        if torch_adam and adam_w_mode:
            defaults["weight_decay"] = 1e-2  # torch_adam builds torch.optim.AdamW, whose default differs
    else:
        defaults = dict(_DEFAULTS[name])
        if name == "lamb":
            extra.update(use_triton=use_triton, trust_segments=trust_segments, norm_reduce=norm_reduce,
                         model_parallel=model_parallel)
        if name in COMPRESSED_OPTIMIZER_TYPES:
            extra.update(compressed_allreduce=compressed_allreduce, world_size=world_size, padding=padding)
            if name == "onebitlamb":
                extra.update(segments=segments, model_parallel=model_parallel)
            _warn_compressed_no_ops(kind, params)

    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(f"optimizer.params: unknown key(s) {unknown} for type {kind!r}; "
                          f"accepted keys are {sorted(defaults)}")
    merged = {**defaults, **{key: _checked_value(key, value, defaults[key]) for key, value in params.items()}}
    return _FACTORIES[base](**merged, **extra)


def _warn_compressed_no_ops(kind: str, params: dict[str, Any]) -> None:
    """Keys DeepSpeed's compressed optimizers accept and never use, and ``cuda_aware`` (an MPI switch)."""
    for key in ("bias_correction", "eps_inside_sqrt"):
        if params.get(key) is True:
            warnings.warn(f"optimizer.params.{key} = true has no effect for {kind} (DeepSpeed's ignores it "
                          "too: no bias correction, eps outside the root)", stacklevel=4)
    if params.get("cuda_aware") is True:
        warnings.warn(f"optimizer.params.cuda_aware = true has no effect for {kind} in zerostep: its "
                      "compressed exchange runs over the engine's process group, on whatever device that "
                      "group uses", stacklevel=4)
    backend = params.get("comm_backend_name", "nccl")
    if not isinstance(backend, str):
        raise ConfigError(f"optimizer.params.comm_backend_name: {_show(backend)} is invalid; it must be a "
                          "string")


# --- value validation: the kind each default has, in the range the float32 optimizer math can hold ---

_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def _show(value: Any) -> str:
    # An int of more than 4300 digits has no repr (ValueError since Python 3.11).
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4000:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _flag(params: dict[str, Any], key: str, default: bool) -> bool:
    value = params.pop(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"optimizer.params.{key}: {_show(value)} is invalid; it must be true or false")
    return value


def _real(key: str, value: Any) -> float:
    """A finite float32-sized number: the optimizers keep their state and hyperparameters in float32,
    where 1e308 is infinity (and an int beyond float range cannot even be converted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"optimizer.params.{key}: {_show(value)} is invalid; it must be a number")
    if not -_FLOAT32_MAX <= value <= _FLOAT32_MAX:  # false for NaN too
        raise ConfigError(f"optimizer.params.{key}: {_show(value)} is invalid; it must be a finite number "
                          "within float32's range (|x| <= 3.4e38)")
    return float(value)


def _checked_value(key: str, value: Any, default: Any) -> Any:
    """A user's param, checked against the kind of its default: a flag, a pair of numbers or a number.
    Ranges (lr >= 0, betas in [0, 1), ...) are each optimizer's own checks."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"optimizer.params.{key}: {_show(value)} is invalid; it must be true or false")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ConfigError(f"optimizer.params.{key}: {_show(value)} is invalid; it must be a list of "
                              f"{len(default)} numbers")
        return tuple(_real(f"{key}[{index}]", item) for index, item in enumerate(value))
    if isinstance(default, (int, float)):
        return _real(key, value)
    return value
