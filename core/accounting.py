"""Per-rank memory and per-step communication, computed from the plan and the state.

``memory_report`` counts the bytes each rank keeps: parameters (compute dtype), fp32 master, optimizer
state, and the gradient buffer a step accumulates into (the full compute-dtype buffer at stages 0-1,
this rank's shard at stages 2-3; it exists only during a step, but it is what ZeRO's table counts).
Tensors shared between leaves (fp32 params that are the master) are counted once. With Ψ parameters
and N ranks in mixed precision with Adam this gives DESIGN.md's table: 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N,
16Ψ/N, up to padding.

``step_comm_plan`` lists the collectives one step issues (``parallel.collectives`` conventions:
all-reduce 2B, reduce-scatter B, all-gather B), so the counter is right even inside compiled graphs.
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from zerostep.core.state import TrainState
from zerostep.core.step import StepPlan
from zerostep.parallel import collectives as C
from zerostep.parallel.zero3 import ROOT_UNIT


def _bytes(tree: Any, seen: set[int]) -> int:
    total = 0
    for t in optree.tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def memory_report(plan: StepPlan, state: TrainState, gather_high_water: int = 0) -> dict[str, int]:
    """Per-rank bytes by kind; ``total`` is their sum (``stage3_gather_high_water`` not included)."""
    seen: set[int] = set()
    master = _bytes(state.master, seen)
    params = _bytes(state.params.flats, seen)
    opt = _bytes(state.opt_state, seen)
    itemsize = torch.empty((), dtype=plan.compute_dtype).element_size()
    grad_numel = sum(
        lay.padded_numel if plan.stage <= 1 else lay.shard_numel for lay in plan.layouts.values()
    )
    report = {
        "params": params,
        "master": master,
        "optimizer_state": opt,
        "gradients": grad_numel * itemsize,
    }
    report["total"] = sum(report.values())
    report["stage3_gather_high_water"] = gather_high_water
    return report


def step_comm_plan(plan: StepPlan, applied: bool = True) -> C.CommPlan:
    """The collectives of one step (``applied=False``: a skipped step gathers no parameters)."""
    ws, dt = plan.world_size, plan.compute_dtype
    gas = plan.accumulation_steps
    # overlapped reductions run one collective per unit (the unit is the bucket)
    reduce_bucket = None if plan.overlap_comm else plan.reduce_bucket_numel
    out = C.all_reduce_plan(2, torch.float32, ws)  # the [sumsq, loss] pair of the finite check
    for g, lay in plan.layouts.items():
        n = lay.padded_numel
        if plan.stage == 0:
            out = out + C.all_reduce_plan(n, dt, ws, reduce_bucket)
        elif plan.stage in (1, 2):
            per_step = 1 if plan.stage == 1 else gas
            out = out + C.reduce_scatter_plan(n, dt, ws, reduce_bucket).times(per_step)
            if applied:
                out = out + C.all_gather_plan(n, dt, ws, plan.allgather_bucket_numel)
        else:
            # a block is gathered for its forward and again for its backward; the root unit stays
            # gathered through both (parallel.zero3), so once per micro-batch
            gathers = 1 if g == ROOT_UNIT else 2
            out = out + C.all_gather_plan(n, dt, ws).times(gathers * gas)
            out = out + C.reduce_scatter_plan(n, dt, ws).times(gas)
    return out
