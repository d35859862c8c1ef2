"""A script's own optimizer (``initialize(optimizer=...)``) as a zerostep optimizer block plus param groups.

DeepSpeed runs a client torch optimizer on its fp32 master partitions. zerostep does the same by reading
what the optimizer *is* (its class and each parameter group's hyperparameters) and running zerostep's own
functional optimizer of that class over the sharded master: the math is the same (zerostep's Adam, SGD,
Adagrad and Lion follow torch.optim's order of operations), the state is sharded and checkpointed with
the engine's, and the update stays one compiled pass per shard.

Supported classes: ``torch.optim.Adam`` (L2 weight decay; ``decoupled_weight_decay=True`` is AdamW),
``AdamW``, ``SGD``, ``Adagrad``, and ``zerostep.ops``' DeepSpeed classes (``FusedAdam``,
``DeepSpeedCPUAdam``, ``FusedLamb``, ``FusedLion`` / ``DeepSpeedCPULion``) where present, run by zerostep's
own fused updates; every other ``torch.optim`` class (RMSprop, NAdam, RAdam, Adamax, ...) runs torch's own
``step`` over views of the shards (``zerostep.optim.torch_adapter``, with its caveat for optimizers that
look across a parameter). A class from outside torch.optim is refused with the list, rather than run
with unknown math.

Per-group ``lr`` and ``weight_decay`` are honoured (core/param_groups.py); any other hyperparameter must
be equal in every group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from zerostep.core.param_groups import ParamGroup
from zerostep.optim.registry import OPTIMIZER_TYPES

# class name -> (zerostep type, {torch hyperparameter key: zerostep key}, fixed extras)
_ADAM_KEYS = {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay"}
_BY_CLASS: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {
    "Adam": ("adam", _ADAM_KEYS, {"adam_w_mode": False}),
    "AdamW": ("adamw", _ADAM_KEYS, {}),
    "SGD": ("sgd", {k: k for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")}, {}),
    "Adagrad": (
        "adagrad",
        {k: k for k in ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")},
        {},
    ),
    "FusedLamb": ("lamb", {**_ADAM_KEYS, "max_coeff": "max_coeff", "min_coeff": "min_coeff"}, {}),
    "FusedLion": ("lion", {"lr": "lr", "betas": "betas", "weight_decay": "weight_decay"}, {}),
    "DeepSpeedCPULion": ("lion", {"lr": "lr", "betas": "betas", "weight_decay": "weight_decay"}, {}),
}


# torch param-group keys that say how to run, not what to compute
_RUN_FLAGS = {"foreach", "fused", "capturable", "differentiable", "maximize"}


def supported_classes() -> list[str]:
    return sorted([*_BY_CLASS, "FusedAdam", "DeepSpeedCPUAdam"])


def optimizer_block(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, str]]:
    """(zerostep ``optimizer`` block of group 0's hyperparameters, torch key -> zerostep key)."""
    cls = type(optimizer).__name__
    first = optimizer.param_groups[0]
    if cls in ("FusedAdam", "DeepSpeedCPUAdam"):
        w_mode = bool(getattr(optimizer, "adam_w_mode", getattr(optimizer, "adamw_mode", True)))
        extras = {"adam_w_mode": w_mode, "bias_correction": bool(first.get("bias_correction", True))}
        kind, keys = "adam", _ADAM_KEYS
    elif cls in _BY_CLASS:
        kind, keys, extras = _BY_CLASS[cls]
        extras = dict(extras)
        if cls == "Adam" and first.get("decoupled_weight_decay"):
            kind, extras = "adamw", {}
    elif cls.lower() in OPTIMIZER_TYPES and type(optimizer).__module__.startswith("torch.optim"):
        # any other torch.optim class: torch's own step over the shards (zerostep.optim.torch_adapter)
        kind, extras = cls, {}
        keys = {k: k for k in optimizer.defaults if k not in _RUN_FLAGS}
    else:
        raise TypeError(
            f"client optimizer {cls} cannot run on zerostep's sharded master weights; supported classes: "
            f"{supported_classes()} and torch.optim's (or name one in the config's optimizer block)"
        )
    for group in optimizer.param_groups:
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise ValueError(f"client optimizer {cls}: {flag}=True is not supported by zerostep")
    params = {zkey: _plain(first[tkey]) for tkey, zkey in keys.items() if tkey in first}
    params.update(extras)
    return {"type": kind, "params": params}, dict(keys)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return list(value) if isinstance(value, tuple) else value


def group_hyperparams(group: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, Any]:
    return {zkey: _plain(group[tkey]) for tkey, zkey in keys.items() if tkey in group}


def param_groups_of(
    model: nn.Module,
    groups: Iterable[Mapping[str, Any]] | Iterable[torch.Tensor],
    keys: Mapping[str, str],
    what: str,
) -> list[ParamGroup]:
    """torch-style groups (dicts with ``params``, or a flat iterable of tensors) -> ``ParamGroup``s by
    parameter name. Frozen parameters are dropped (the engine holds them as constants); a tensor that
    is not one of the model's parameters is an error naming it."""
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    groups = list(groups)
    if groups and isinstance(groups[0], torch.Tensor):
        groups = [{"params": groups}]
    out = []
    for index, group in enumerate(groups):
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError(f"{what}[{index}]: a param group must be a dict with 'params', got {group!r:.80}")
        tensors = group["params"]
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        picked = []
        for t in tensors:
            if id(t) not in names:
                raise ValueError(
                    f"{what}[{index}] holds a tensor of shape {tuple(t.shape)} that is not a parameter of "
                    f"the model passed to initialize(); every optimized tensor must be one of "
                    f"model.parameters()"
                )
            if t.requires_grad:
                picked.append(names[id(t)])
        if picked:
            out.append(ParamGroup(tuple(picked), group_hyperparams(group, keys)))
    return out
