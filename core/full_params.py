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
        if plan.sharded_master:
            out[g] = all_gather_flat(shard.to(engine.device).contiguous(), engine.group)  # offloaded: host
        else:
            out[g] = shard
    return out


def full_params(engine: Any, state: TrainState) -> dict[str, torch.Tensor]:
    """Parameter name -> fp32 tensor, in the model's ``named_parameters`` order (copies)."""
    by_name = {}
    for g, full in gathered_flats(engine, state).items():
        for name, view in engine.plan.layouts[g].unflatten(full).items():
            by_name[name] = view.to(torch.float32, copy=True)  # a low-precision master, widened
    if getattr(engine, "tp_specs", None) is not None:  # AutoTP shards -> full tensors (model_parallel.py)
        from zerostep.core.model_parallel import full_tensors

        by_name = full_tensors(engine.mesh, engine.tp_specs, by_name)
    order = [n for n, _ in engine.model.named_parameters() if n in by_name]
    return {n: by_name[n] for n in order}
