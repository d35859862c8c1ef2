"""Phase 3 of the step: ``Reducer``s sum gradients over ranks and accumulate micro-batches.

``compose`` (step.py) calls ``grad_hooks(last)`` before each micro-batch's backward, hands the backward
the reducer's ``grad_sink`` (stage 2), calls ``add(grads, last)`` after it and ``result()`` once for the
update. Which collective runs when depends on the ZeRO stage: stage 0 all-reduces at the accumulation
boundary, stage 1 reduce-scatters at the boundary, stage 2 reduce-scatters every unit's gradient inside
backward as soon as it is complete (``parallel.grad_sharding``: the full gradient is freed at once, so
only shards accumulate); stage 3 and world size 1 only accumulate (``parallel.zero3`` already
reduce-scattered inside backward).

Accumulation over micro-batches runs in ``StepPlan.accumulation_dtype`` (``data_types.grad_accum_dtype``;
unset, the compute dtype, as in DeepSpeed 0.19): with fp32 under bf16, each micro-batch's compute-dtype
gradient is added into an fp32 sum, and collectives still move the compute dtype (DeepSpeed's
``communication_data_type`` default): stages 0-1 round the fp32 sum once, at the boundary, for their
collective; stages 2-3 reduce each micro-batch's gradient and add the reduced shard into an fp32 shard.
With one micro-batch there is nothing to accumulate and the gradient stays in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optree
import torch

from zerostep.core.compiling import compile_private
from zerostep.core.precision import DTYPES
from zerostep.errors import ConfigError
from zerostep.parallel import collectives
from zerostep.parallel.grad_sharding import GradShardSink

if TYPE_CHECKING:
    from zerostep.core.step import StepPlan

Flats = dict[str, torch.Tensor]
Grads = dict[str, "torch.Tensor | list[torch.Tensor]"]


def grad_accum_dtype_of(name: str | None, compute_dtype: torch.dtype) -> torch.dtype:
    """``data_types.grad_accum_dtype`` ("fp32", "fp16", "bf16" or None) for a compute dtype: None is the
    compute dtype (DeepSpeed 0.19's default); otherwise fp32 or the compute dtype itself. A narrower or
    different half dtype would lose what the compute dtype keeps, and DeepSpeed rejects those too."""
    if name is None:
        return compute_dtype
    dtype = DTYPES.get(name)
    if dtype is None:
        raise ConfigError(
            f"data_types.grad_accum_dtype = {name!r}: must be one of fp32, fp16, bf16 (or null)"
        )
    if dtype not in (torch.float32, compute_dtype):
        compute = {v: k for k, v in DTYPES.items()}[compute_dtype]
        raise ConfigError(
            f"data_types.grad_accum_dtype = {name!r}: gradients are computed in {compute}; they can be "
            f"accumulated in fp32 or in {compute} itself (or leave the key unset)"
        )
    return dtype


class Reducer:
    """Phase 3's interface. The base class accumulates only: world size 1, and stage 3 (whose
    gradients arrive already reduce-scattered from ``parallel.zero3``)."""

    grad_sink: GradShardSink | None = None  # stage 2: where backward sends each unit's full gradient

    def __init__(self, accum_dtype: torch.dtype | None = None) -> None:
        self.acc: Grads | None = None
        self.accum_dtype = accum_dtype  # None: whatever dtype the gradients come in

    def reset(self) -> None:
        self.acc = None

    def grad_hooks(self, last: bool) -> dict[str, Callable] | None:
        return None

    def _accumulate(self, grads: Grads, last: bool) -> None:
        if self.acc is None:
            if last or self.accum_dtype is None:  # one micro-batch: its gradient is the sum
                self.acc = dict(grads)
            else:  # a new sum in the accumulation dtype (the gradients themselves when they have it)
                self.acc = optree.tree_map(lambda t: t.to(self.accum_dtype), dict(grads))
        else:
            for acc, grad in zip(optree.tree_leaves(self.acc), optree.tree_leaves(grads)):
                acc.add_(grad)

    def add(self, grads: Grads, last: bool) -> None:
        self._accumulate(grads, last)

    def result(self) -> Grads:
        acc, self.acc = self.acc, None
        return acc


def _in_dtype(t: torch.Tensor, dtype: torch.dtype, pre: float | None) -> torch.Tensor:
    """What a collective sends: ``t`` in the compute dtype, times the predivide factor (in that order,
    as DeepSpeed casts to its communication dtype and then divides)."""
    t = t.to(dtype)
    return t * pre if pre else t


class CompiledReducer(Reducer):
    """Stages 0-1: collectives after backward, at the boundary, as ``torch.compile``d functional
    collectives (stage 0 all-reduces the accumulated gradients, stage 1 reduce-scatters them)."""

    def __init__(self, plan: StepPlan, group: Any, compile: bool) -> None:
        super().__init__(plan.accumulation_dtype)
        self.stage = plan.stage
        pre, dtype = _predivide(plan), plan.compute_dtype
        bucket = plan.reduce_bucket_numel

        def over_groups(collective: Callable) -> Callable[[Flats], Flats]:
            def run(grads: Flats) -> Flats:
                # each unit over its group: the data-parallel one, or its own (MoE experts)
                return {
                    g: collective(_in_dtype(t, dtype, pre), plan.group_of(g, group), bucket)
                    for g, t in grads.items()
                }

            # over shared memory the collectives are eager calls, which a graph cannot hold
            traced = compile and collectives.shared_memory_channel(group) is None
            traced = traced and not plan.unit_groups  # collectives over several groups: eagerly
            return compile_private(run, dynamic=False, fullgraph=True) if traced else run

        self.all_reduce = over_groups(collectives.all_reduce_flat)
        self.reduce_scatter = over_groups(collectives.reduce_scatter_flat)

    def add(self, grads: Flats, last: bool) -> None:
        self._accumulate(grads, last)
        if last:
            self.acc = (self.all_reduce if self.stage == 0 else self.reduce_scatter)(self.acc)


class OverlappedReducer(Reducer):
    """Stages 0-1: collectives started from gradient hooks while backward is still running
    (``overlap_comm``), on the last micro-batch (the hook adds the earlier micro-batches' sum first).

    Each group's (ZeRO unit's) flat gradient is complete as soon as autograd has produced it; its hook
    starts an async all-reduce (stage 0) or reduce-scatter (stage 1) at once, so the collective of the
    last unit overlaps the backward of the earlier ones."""

    def __init__(self, plan: StepPlan, group: Any) -> None:
        super().__init__(plan.accumulation_dtype)
        self.plan, self.group = plan, group
        self.pre = _predivide(plan)
        self.pending: dict[str, tuple[Any, torch.Tensor]] = {}

    def reset(self) -> None:
        for work, _ in self.pending.values():
            work.wait()  # never leave a collective in flight: the ranks' sequences must stay aligned
        self.pending.clear()
        super().reset()

    def _start(self, g: str, grad: torch.Tensor) -> None:
        # Modifies the hook's argument in place, which tensor hooks normally must not do: here the
        # gradient is the fresh output of the split's backward (one cat per group), which nothing
        # else holds, and the leaf it belongs to is our own detached view.
        if self.acc is not None:
            acc = self.acc[g]
            if acc.dtype == grad.dtype:
                grad.add_(acc)
            else:  # an fp32 sum: the last micro-batch joins it, then it is rounded once
                grad.copy_(acc.add_(grad))
        if self.pre is not None:
            grad.mul_(self.pre)
        group = self.plan.group_of(g, self.group)
        if self.plan.stage == 0:
            self.pending[g] = (collectives.all_reduce_into(grad, group, async_op=True), grad)
        else:
            shard = grad.new_empty(self.plan.layouts[g].shard_numel)
            work = collectives.reduce_scatter_into(shard, grad, group, async_op=True)
            self.pending[g] = (work, shard)

    def grad_hooks(self, last: bool) -> dict[str, Callable] | None:
        if not last:
            return None

        def hook_for(g: str) -> Callable:
            def hook(grad: torch.Tensor) -> None:
                self._start(g, grad)

            return hook

        return {g: hook_for(g) for g in self.plan.layouts}

    def add(self, grads: Flats, last: bool) -> None:
        if not last:  # before the last micro-batch: local sum
            self._accumulate(grads, last)
            return
        # Groups whose hook never fired (unused in this forward) communicate now, in layout order,
        # which is the same on every rank.
        for g in self.plan.layouts:
            if g not in self.pending:
                self._start(g, grads[g])
        reduced = {}
        for g in grads:
            work, out = self.pending.pop(g)
            work.wait()
            reduced[g] = out
        self.acc = reduced


class ShardingReducer(Reducer):
    """Stage 2: the backward reduce-scatters each unit's gradient into its shard as soon as the unit is
    done (``parallel.grad_sharding``, through this reducer's ``grad_sink``) and hands the shard to
    ``add_unit``, which adds it into the accumulator at once: neither the full gradients nor this
    micro-batch's shards of every unit are ever alive together. Such a backward returns no gradients
    (``add({}, last)``).

    Full gradients [N * S] handed to ``add`` (a backward that did not use the sink: the DeepSpeed
    facade's ``core/micro_steps.py``, or a failed rank's zero placeholders) are reduce-scattered here,
    with the same predivide and buckets."""

    def __init__(self, plan: StepPlan, group: Any) -> None:
        super().__init__(plan.accumulation_dtype)
        self.layouts = plan.layouts
        self.grad_sink = GradShardSink(
            group,
            plan.reduce_bucket_numel,
            _predivide(plan),
            overlap=plan.overlap_comm,
            unit_groups={g: u.group for g, u in plan.unit_groups.items()},
        )
        self.grad_sink.deliver = self.add_unit
        self.last = True  # whether the micro-batch whose backward runs now is the last one

    def reset(self) -> None:
        self.grad_sink.wait()  # never leave a collective in flight
        super().reset()

    def grad_hooks(self, last: bool) -> None:
        self.last = last  # called before each micro-batch's backward (step.compose, core/micro_steps.py)
        return None

    def add_unit(self, g: str, shard: torch.Tensor) -> None:
        """One unit's reduced shard [S] of the current micro-batch."""
        acc = self.acc = {} if self.acc is None else self.acc
        if g not in acc:
            acc[g] = shard if self.last or self.accum_dtype is None else shard.to(self.accum_dtype)
        else:
            acc[g].add_(shard)

    def add(self, grads: Flats, last: bool) -> None:
        self.last = last
        sink = self.grad_sink
        for g, grad in grads.items():
            n = self.layouts[g].shard_numel
            if grad.numel() == n:
                self.add_unit(g, grad)
                continue
            full = grad.contiguous()  # a full gradient: reduce a copy when the predivide scales in place
            sink.reduce(
                full.clone() if sink.predivide is not None else full,
                n,
                lambda s, g=g: self.add_unit(g, s),
                unit=g,
            )
        sink.wait()


def _predivide(plan: StepPlan) -> float | None:
    return 1.0 / plan.predivide_factor if plan.predivide_factor != 1.0 else None


def make_reduce_scatter(plan: StepPlan, group: Any, compile: bool) -> Reducer:
    """Phase 3 for a plan: sum gradients over ranks (module docstring)."""
    if plan.world_size == 1 or plan.stage == 3:
        return Reducer(plan.accumulation_dtype)
    if plan.shards_grads_in_backward:
        return ShardingReducer(plan, group)
    return OverlappedReducer(plan, group) if plan.overlap_comm else CompiledReducer(plan, group, compile)
