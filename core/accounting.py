"""Per-rank memory and per-step communication, computed from the plan and the state.

``memory_report`` counts the bytes each rank keeps: parameters (compute dtype), fp32 master, optimizer
state, and the gradient buffer a step accumulates into (the full buffer at stages 0-1, this rank's shard
at stages 2-3, in the accumulation dtype; it exists only during a step, but it is what ZeRO's table
counts), and separately the gradient's peak inside a step (accumulator plus the full gradients alive at
once: a micro-batch's at stages 0-1, about two units' at stages 2-3).
Tensors shared between leaves (fp32 params that are the master) are counted once. With Ψ parameters
and N ranks in mixed precision with Adam this gives DESIGN.md's table: 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N,
16Ψ/N, up to padding.

``step_comm_plan`` lists the collectives one step issues (``parallel.collectives`` conventions:
all-reduce 2B, reduce-scatter B, all-gather B, all-to-all the bytes this rank sends), so the counter is
right even inside compiled graphs; with the optimizer, also those its update issues itself (Muon's on
sharded units, ``optim.muon_shards``).
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from zerostep.core.state import TrainState
from zerostep.core.step import StepPlan
from zerostep.optim import layout_pieces
from zerostep.optim.base import Optimizer
from zerostep.optim.muon import unit_matrices
from zerostep.optim.muon_shards import comm_calls, comm_elements
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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def gradient_bytes(plan: StepPlan) -> tuple[int, int]:
    """(accumulator, peak): the bytes of the gradient sum a step keeps across its micro-batches, and the
    most gradient bytes alive at once during a step (accumulator included), both per rank.

    The accumulator is the full buffer at stages 0-1 and this rank's shard at stages 2-3, in
    ``accumulation_dtype`` when there are several micro-batches (one micro-batch's reduced gradient is
    the sum: compute dtype). On top of it, while a micro-batch runs:

    - stages 0-1: that micro-batch's full gradients, which a backward returns all at once, and the
      collective's output at the boundary (stage 0 all-reduces into a new buffer unless its hooks
      reduce in place with ``overlap_comm``; stage 1 reduce-scatters into a shard), plus a rounded copy
      of a wider sum for the collective, or with ``overlap_comm`` one unit's parameter gradients
      alongside their concatenation;
    - stage 2: the unit being assembled: one parameter's gradient and the unit's full buffer it is
      copied into (``parallel.grad_sharding``), the root unit's buffer, which stays open from the head's
      gradient to the embedding's, and the reduced shard before it joins the accumulator; with
      ``overlap_comm`` up to two more units' buffers in flight;
    - stage 3: the unit's full gradient and the gradients it is made of (``parallel.zero3``), one more
      unit's in flight (its reduce-scatters overlap the next unit's backward), and the micro-batch's
      shards, which the runner returns together.
    """
    c = _itemsize(plan.compute_dtype)
    several = plan.accumulation_steps > 1
    a = _itemsize(plan.accumulation_dtype) if several else c
    layouts = plan.layouts.values()
    full = sum(lay.padded_numel for lay in layouts)
    shard = sum(lay.shard_numel for lay in layouts)
    if plan.world_size == 1:
        acc = full * a  # one process: the gradient is the whole buffer at every stage
        return acc, acc + (full * c if several else 0)
    if plan.stage <= 1:
        acc = full * a
        output = shard if plan.stage == 1 else (0 if plan.overlap_comm else full)
        # a wider sum is rounded to the compute dtype for the collective: into a new buffer, unless the
        # hooks of overlap_comm round it into the last micro-batch's gradient
        cast = full if several and a != c and not plan.overlap_comm else 0
        # the hooks see each unit's gradient as the concatenation of its parameters' (alive together)
        unit = max(lay.padded_numel for lay in layouts) if plan.overlap_comm else 0
        return acc, (acc if several else 0) + (full + output + cast + unit) * c
    acc = shard * a
    largest = max(lay.padded_numel for lay in layouts)
    if plan.stage == 2:
        root = plan.layouts.get(ROOT_UNIT)
        root_open = root.padded_numel if root is not None and len(plan.layouts) > 1 else 0
        in_flight = 2 * largest if plan.overlap_comm else 0
        transient = 2 * largest + root_open + in_flight + max(lay.shard_numel for lay in layouts)
        return acc, acc + transient * c
    return acc, acc + (3 * largest + (shard if several else 0)) * c


def memory_report(
    plan: StepPlan,
    state: TrainState,
    gather_high_water: int = 0,
    host_staging: int = 0,
    host_params: bool = False,
) -> dict[str, int]:
    """Per-rank bytes by kind; ``total`` is the sum of the first four (ZeRO's model states: the gradient
    accumulator, not the gradient's peak). ``gradients_peak``: the most gradient bytes alive at once
    inside a step (``gradient_bytes``); ``stage3_gather_high_water``: the gathered parameters' measured
    high-water mark of the last stage-3 call. Where the state lives: ``device``, the model states in
    the engine's device memory (``total`` without offload); ``host``, those offloaded to host memory
    (``offload_optimizer``: master and optimizer state; ``host_params``, offload_param: the parameter
    shards too) plus ``offload_staging``, the offloaded update's host gradient and parameter buffers
    (``host_staging``, core/offload.py)."""
    seen: set[int] = set()
    master = _bytes(state.master, seen)
    params = _bytes(state.params.flats, seen)
    opt = _bytes(state.opt_state, seen)
    accumulator, peak = gradient_bytes(plan)
    report = {
        "params": params,
        "master": master,
        "optimizer_state": opt,
        "gradients": accumulator,
    }
    report["total"] = sum(report.values())
    report["gradients_peak"] = peak
    report["stage3_gather_high_water"] = gather_high_water
    offloaded = (master + opt if plan.offload_optimizer else 0) + (params if host_params else 0)
    report["device"] = report["total"] - offloaded
    report["host"] = offloaded + host_staging
    report["offload_staging"] = host_staging
    return report


def optimizer_comm_plan(plan: StepPlan, optimizer: Optimizer | None) -> C.CommPlan:
    """The collectives ``optimizer``'s update issues on this rank per step: Muon's on sharded units
    (fp32 directions: an all-gather of each unit with a Muon matrix, or the owner strategy's two
    all-to-alls of each unit with a matrix cut by a shard boundary); none for the others."""
    if optimizer is None or optimizer.name != "muon" or not plan.sharded_master:
        return C.CommPlan()
    strategy, adjust = optimizer.hyperparams["distributed"], optimizer.hyperparams["adjust_lr_fn"]
    ws, out = plan.world_size, C.CommPlan()
    for lay in plan.layouts.values():
        lo, hi = lay.shard_range(plan.rank)
        pieces = layout_pieces(lay.entries, lo, hi, sharded=True, full_numel=lay.padded_numel)
        matrices, shard = unit_matrices(pieces, adjust), lay.shard_numel
        calls = comm_calls(matrices, shard, ws, strategy)
        if calls:
            nbytes = comm_elements(matrices, plan.rank, shard, ws, strategy) * 4  # fp32
            kind = C.ALL_GATHER if strategy == "allgather" else C.ALL_TO_ALL
            out = out + C.CommPlan((C.CommOp(kind, nbytes, calls),))
    return out


def step_comm_plan(plan: StepPlan, applied: bool = True, optimizer: Optimizer | None = None) -> C.CommPlan:
    """The collectives of one step (``applied=False``: a skipped step gathers no parameters and runs
    no update); with ``optimizer``, its update's own (``optimizer_comm_plan``)."""
    dt, gas = plan.compute_dtype, plan.accumulation_steps
    # overlapped reductions run one collective per unit (the unit is the bucket)
    reduce_bucket = None if plan.overlap_comm else plan.reduce_bucket_numel
    out = C.all_reduce_plan(2, torch.float32, plan.world_size)  # the [sumsq, loss] pair of the finite check
    for g, lay in plan.layouts.items():
        n = lay.padded_numel
        ws = plan.unit_size(g)  # MoE experts: over their expert-data-parallel group
        if ws == 1:
            continue
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
    return (out + optimizer_comm_plan(plan, optimizer)) if applied else out
