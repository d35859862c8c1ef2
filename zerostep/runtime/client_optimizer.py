"""A script's own optimizer (``initialize(optimizer=...)``) as a zerostep optimizer block plus param groups.

DeepSpeed runs a client torch optimizer on its fp32 master partitions. zerostep does the same by reading
what the optimizer *is* (its class and each parameter group's hyperparameters) and running a zerostep
optimizer of that class over the sharded master, with the engine's sharded, checkpointed state:

- ``torch.optim.Adam`` / ``AdamW`` / ``SGD`` / ``Adagrad`` and ``zerostep.ops``' DeepSpeed classes
  (``FusedAdam``, ``DeepSpeedCPUAdam``, ``FusedLamb``, ``FusedLion``, ``DeepSpeedCPULion``,
  ``DeepSpeedCPUAdagrad``) become zerostep's fused updates, whose math is theirs
  (``zerostep.ops.zerostep_optimizer_spec`` says which, with which arguments);
- every other ``torch.optim`` class (RMSprop, NAdam, RAdam, Adamax, ...) runs torch's own ``step`` over
  views of the shards (``zerostep.optim.torch_adapter``, with its caveat for optimizers that look
  across a parameter);
- a class from outside torch.optim is refused with the list, rather than run with unknown math.

Per-group ``lr`` and ``weight_decay`` are honoured (core/param_groups.py); any other hyperparameter must
be equal in every group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from zerostep.core.param_groups import ParamGroup
from zerostep.ops.spec import zerostep_optimizer_spec
from zerostep.optim.registry import OPTIMIZER_TYPES

# torch param-group keys that say how to run, not what to compute
_RUN_FLAGS = {"foreach", "fused", "capturable", "differentiable", "maximize", "params", "initial_lr"}
GroupOptions = Callable[[Mapping[str, Any]], dict[str, Any]]


def supported_classes() -> list[str]:
    return [
        "torch.optim.*",
        "FusedAdam",
        "DeepSpeedCPUAdam",
        "FusedLamb",
        "FusedLion",
        "DeepSpeedCPULion",
        "DeepSpeedCPUAdagrad",
    ]


def optimizer_block(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], GroupOptions]:
    """(zerostep ``optimizer`` block of group 0's hyperparameters, group -> its hyperparameters)."""
    cls = type(optimizer).__name__
    for group in optimizer.param_groups:
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise ValueError(f"client optimizer {cls}: {flag}=True is not supported by zerostep")
    spec = zerostep_optimizer_spec(optimizer)
    if spec is not None:
        kind, params = spec

        def options(group: Mapping[str, Any]) -> dict[str, Any]:
            found = zerostep_optimizer_spec(optimizer, group)
            return {k: _plain(v) for k, v in (found[1] if found else {}).items()}

    elif cls.lower() in OPTIMIZER_TYPES and type(optimizer).__module__.startswith("torch.optim"):
        kind = cls
        keys = [k for k in optimizer.defaults if k not in _RUN_FLAGS]

        def options(group: Mapping[str, Any]) -> dict[str, Any]:
            return {k: _plain(group[k]) for k in keys if k in group}

        params = options(optimizer.param_groups[0])
    else:
        raise TypeError(
            f"client optimizer {cls} cannot run on zerostep's sharded master weights; supported classes: "
            f"{supported_classes()} (or name one in the config's optimizer block)"
        )
    return {"type": kind, "params": {k: _plain(v) for k, v in params.items()}}, options


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return list(value) if isinstance(value, tuple) else value


def param_groups_of(
    model: nn.Module,
    groups: Iterable[Mapping[str, Any]] | Iterable[torch.Tensor],
    options: GroupOptions,
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
            out.append(ParamGroup(tuple(picked), options(group)))
    return out
