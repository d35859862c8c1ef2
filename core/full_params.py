"""Gathering fp32 parameters from a state on every rank (engine.full_params, exports, stage-3 eval)."""

from __future__ import annotations

from typing import Any

import torch

from zerostep.core.state import TrainState
from zerostep.parallel.collectives import all_gather_flat


def gathered_flats(engine: Any, state: TrainState) -> dict[str, torch.Tensor]:
    """Group -> full fp32 flat buffer [padded_numel] (new tensors when sharded, else the master itself)."""
    plan = engine.plan
    out = {}
    for g, shard in state.master.items():
        if plan.sharded_master:  # over the unit's group: MoE experts over their expert-data-parallel one
            group = plan.group_of(g, engine.group)
            out[g] = all_gather_flat(shard.to(engine.device).contiguous(), group)  # offloaded: host
        else:
            out[g] = shard
    return out


def full_params(engine: Any, state: TrainState) -> dict[str, torch.Tensor]:
    """Parameter name -> fp32 tensor, in the model's ``named_parameters`` order (copies). MoE experts
    come under their global names, every layer's ``num_experts`` of them (gathered over the expert-parallel
    group, core/expert_units.py), where the model holds its local experts."""
    by_name = {}
    experts = getattr(engine, "expert_units", None) or {}
    expert_order: dict[str, list[str]] = {}  # the first local name of a unit -> its global names
    for g, full in gathered_flats(engine, state).items():
        views = engine.plan.layouts[g].unflatten(full)
        if g in experts:
            views = experts.global_tensors(g, full, engine.plan.layouts[g])
            expert_order[engine.plan.layouts[g].names[0]] = list(views)
        for name, view in views.items():
            by_name[name] = view.to(torch.float32, copy=True)  # a low-precision master, widened
    if getattr(engine, "tp_specs", None) is not None:  # AutoTP shards -> full tensors (model_parallel.py)
        from zerostep.core.model_parallel import full_tensors

        by_name = full_tensors(engine.mesh, engine.tp_specs, by_name)
    order = []
    for n, _ in engine.model.named_parameters():
        if n in expert_order:
            order += expert_order[n]
        elif n in by_name:
            order.append(n)
    order = list(dict.fromkeys(order))
    return {n: by_name[n] for n in order}
