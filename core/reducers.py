"""Phase 3 of the step: ``Reducer``s sum gradients over ranks and accumulate micro-batches.

``compose`` (step.py) calls ``grad_hooks(last)`` before each micro-batch's backward, ``add(grads, last)``
after it and ``result()`` once for the update. Which collective runs when depends on the ZeRO stage:
stage 0 all-reduces at the accumulation boundary, stage 1 reduce-scatters at the boundary, stage 2
reduce-scatters every micro-batch (its accumulator is a shard); stage 3 and world size 1 only
accumulate (``parallel.zero3`` already reduce-scattered inside backward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optree
import torch

from zerostep.core.compiling import compile_private
from zerostep.parallel import collectives

if TYPE_CHECKING:
    from zerostep.core.step import StepPlan

Flats = dict[str, torch.Tensor]
Grads = dict[str, "torch.Tensor | list[torch.Tensor]"]


class Reducer:
    """Phase 3's interface. The base class accumulates only: world size 1, and stage 3 (whose
    gradients arrive already reduce-scattered from ``parallel.zero3``)."""

    def __init__(self) -> None:
        self.acc: Flats | None = None

    def reset(self) -> None:
        self.acc = None

    def grad_hooks(self, last: bool) -> dict[str, Callable] | None:
        return None

    def _accumulate(self, grads: Grads) -> None:
        if self.acc is None:
            self.acc = dict(grads)
        else:
            for acc, grad in zip(optree.tree_leaves(self.acc), optree.tree_leaves(grads)):
                acc.add_(grad)

    def add(self, grads: Flats, last: bool) -> None:
        self._accumulate(grads)

    def result(self) -> Flats:
        acc, self.acc = self.acc, None
        return acc


class CompiledReducer(Reducer):
    """Collectives after backward, as ``torch.compile``d functional collectives.

    Stage 0 all-reduces the accumulated gradients at the boundary, stage 1 reduce-scatters them at
    the boundary, stage 2 reduce-scatters every micro-batch (its accumulator is a shard)."""

    def __init__(self, plan: StepPlan, group: Any, compile: bool) -> None:
        super().__init__()
        self.stage = plan.stage
        pre = _predivide(plan)
        bucket = plan.reduce_bucket_numel

        def over_groups(collective: Callable) -> Callable[[Flats], Flats]:
            def run(grads: Flats) -> Flats:
                return {g: collective(t * pre if pre else t, group, bucket) for g, t in grads.items()}

            # over shared memory the collectives are eager calls, which a graph cannot hold
            traced = compile and collectives.shared_memory_channel(group) is None
            return compile_private(run, dynamic=False, fullgraph=True) if traced else run

        self.all_reduce = over_groups(collectives.all_reduce_flat)
        self.reduce_scatter = over_groups(collectives.reduce_scatter_flat)

    def add(self, grads: Flats, last: bool) -> None:
        if self.stage == 2:
            self._accumulate(self.reduce_scatter(grads))
            return
        self._accumulate(grads)
        if last:
            self.acc = (self.all_reduce if self.stage == 0 else self.reduce_scatter)(self.acc)


class OverlappedReducer(Reducer):
    """Collectives started from gradient hooks while backward is still running (``overlap_comm``).

    Each group's (ZeRO unit's) flat gradient is complete as soon as autograd has produced it; its hook
    starts an async all-reduce (stage 0) or reduce-scatter (stages 1-2) at once, so the collective of
    the last unit overlaps the backward of the earlier ones. Stages 0-1 communicate on the last
    micro-batch only (the hook adds the earlier micro-batches' sum first); stage 2 on every one."""

    def __init__(self, plan: StepPlan, group: Any) -> None:
        super().__init__()
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
        if self.plan.stage < 2 and self.acc is not None:
            grad.add_(self.acc[g])
        if self.pre is not None:
            grad.mul_(self.pre)
        if self.plan.stage == 0:
            self.pending[g] = (collectives.all_reduce_into(grad, self.group, async_op=True), grad)
        else:
            shard = grad.new_empty(self.plan.layouts[g].shard_numel)
            work = collectives.reduce_scatter_into(shard, grad, self.group, async_op=True)
            self.pending[g] = (work, shard)

    def grad_hooks(self, last: bool) -> dict[str, Callable] | None:
        if self.plan.stage < 2 and not last:
            return None

        def hook_for(g: str) -> Callable:
            def hook(grad: torch.Tensor) -> None:
                self._start(g, grad)

            return hook

        return {g: hook_for(g) for g in self.plan.layouts}

    def add(self, grads: Flats, last: bool) -> None:
        if self.plan.stage < 2 and not last:  # stages 0-1 before the last micro-batch: local sum
            self._accumulate(grads)
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
        if self.plan.stage == 2:
            self._accumulate(reduced)
        else:
            self.acc = reduced


def _predivide(plan: StepPlan) -> float | None:
    return 1.0 / plan.predivide_factor if plan.predivide_factor != 1.0 else None


def make_reduce_scatter(plan: StepPlan, group: Any, compile: bool) -> Reducer:
    """Phase 3 for a plan: sum gradients over ranks (module docstring)."""
    if plan.world_size == 1 or plan.stage == 3:
        return Reducer()
    return OverlappedReducer(plan, group) if plan.overlap_comm else CompiledReducer(plan, group, compile)
