"""DeepSpeed's ``deepspeed.moe.utils``: telling expert parameters apart and grouping them for optimizers.

An expert parameter is one marked ``allreduce = False`` (``Experts`` marks its copies and names their
``group_name``); the engine reduces their gradients over their expert-data-parallel group only.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from zerostep.moe.layer import MoE


def has_moe_layers(m: nn.Module) -> tuple[bool, int]:
    """``(True, num_experts of the first MoE layer)`` if ``m`` holds one, else ``(False, 0)``."""
    for module in m.modules():
        if isinstance(module, MoE):
            return True, module.num_experts
    return False, 0


def is_moe_param(param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False


def split_params_into_shared_and_expert_params(
    params: list[nn.Parameter],
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    shared = [p for p in params if not is_moe_param(p)]
    expert = [p for p in params if is_moe_param(p)]
    return shared, expert


def split_params_grads_into_shared_and_expert_params(
    group: list[nn.Parameter],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The gradients of ``group``'s parameters that have one, split (each cast to its parameter's dtype)."""
    shared, expert = [], []
    for p in group:
        if p.grad is not None:
            (expert if is_moe_param(p) else shared).append(p.grad.to(p.dtype))
    return shared, expert


def split_params_into_different_moe_groups_for_optimizer(
    param_groups: dict[str, Any] | tuple[dict[str, Any], ...] | list[dict[str, Any]],
    max_group_size: int | float | None = 178956971,
) -> list[dict[str, Any]]:
    """DeepSpeed's split: every group loses its expert parameters to new groups, one per (group,
    expert group name), marked ``moe: True`` and named by the expert group, each cut into pieces of at
    most ``max_group_size`` elements. The input groups are edited in place, as in DeepSpeed; each needs a
    ``name`` when any parameter is an expert's."""
    if isinstance(param_groups, tuple):
        param_groups = list(param_groups)
    elif isinstance(param_groups, dict):
        param_groups = [param_groups]
    elif not isinstance(param_groups, list):
        raise ValueError(f"Unknown param group type of {type(param_groups)}")
    names = {p.group_name for g in param_groups for p in g["params"] if is_moe_param(p)}
    if names and any("name" not in g for g in param_groups):
        raise ValueError(
            "split_params_into_different_moe_groups_for_optimizer: every param group needs a 'name'"
        )
    moe_groups: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for g in param_groups:
        for key in sorted(names):
            moe_groups[g["name"]][key] = {**g, "name": key, "moe": True, "params": []}
    for g in param_groups:
        dense = []
        for p in g["params"]:
            if is_moe_param(p):
                moe_groups[g["name"]][p.group_name]["params"].append(p)
            else:
                dense.append(p)
        g["params"] = dense
    for by_name in moe_groups.values():
        for g in by_name.values():
            if max_group_size is None:
                param_groups.append(g)
                continue
            pieces: list[list[nn.Parameter]] = []
            current: list[nn.Parameter] = []
            size = 0
            for p in g["params"]:
                n = getattr(p, "ds_numel", p.numel())
                if size + n <= max_group_size:
                    current.append(p)
                    size += n
                else:
                    if current:  # DeepSpeed appends an empty group when the first one is too big
                        pieces.append(current)
                    current, size = [p], n
            if current:
                pieces.append(current)
            param_groups.extend({**g, "params": piece} for piece in pieces)
    return param_groups


def is_moe_param_group(param_group: dict[str, Any]) -> bool:
    return bool(param_group.get("moe", False))


def configure_moe_param_groups(model_parameters: list) -> list[dict[str, Any]] | list:
    """Parameters or param groups as DeepSpeed's ``initialize`` prepares them for an MoE model."""
    if not isinstance(model_parameters, list):
        raise TypeError("configure_moe_param_groups: model_parameters must be a list")
    for p in model_parameters:
        if not isinstance(p, torch.Tensor | dict):
            raise TypeError(
                "param argument that would be given to the optimizer should be an iterable of Tensors or "
                f"dicts, but got {type(p)}"
            )
    first = model_parameters[0]
    if isinstance(first, nn.Parameter):
        return split_params_into_different_moe_groups_for_optimizer(
            {"params": model_parameters, "name": "dense-params"}
        )
    if isinstance(first, dict) and not any("moe" in g for g in model_parameters):
        return split_params_into_different_moe_groups_for_optimizer(model_parameters)
    return model_parameters
