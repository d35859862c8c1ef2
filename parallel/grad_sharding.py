"""Gradients reduce-scattered inside backward, unit by unit (ZeRO stage 2).

Stage 2 keeps only this rank's shard of the gradients. If backward returned every unit's full gradient
[N * S] and the reduce-scatter ran afterwards, the step's gradient peak would be stage 1's (the whole
model's gradient at once). ``ShardedBackward`` instead runs backward on per-parameter leaves (views of
the unit's flat parameter buffer) with a post-accumulate-grad hook on each: a parameter's gradient is
copied into its unit's full buffer [N * S] the moment autograd has produced it and released at once;
when the unit's last parameter has arrived, the buffer is reduce-scattered (``GradShardSink``) into the
shard [S] and released too. About one unit's full gradient is alive at a time (plus the root unit's,
whose embedding is the last thing backward reaches).

Why per-parameter leaves and an eager backward: autograd runs ready nodes latest-created first and
delivers leaf gradients at once, so a leaf's hook fires as soon as its gradient exists. A flat leaf split
into views up front (the views' backward is one ``cat`` per unit) gets its gradient only after the whole
backward, because its split node is the oldest of all; and a compiled (AOTAutograd) backward, traced in
that same order, computed every unit's gradient before the first reduction and inductor fused kernels
across units besides (measured: 12 units' gradients alive of an 8-unit model, against 4.7 here).

A ``GradShardSink`` reduces synchronously, or with ``overlap`` asynchronously (a transport with real
async collectives): the reduce-scatter of one unit then runs while the backward of the next computes,
and at most ``max_in_flight`` reductions (and their full buffers) are alive at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from zerostep.parallel import collectives
from zerostep.parallel.flat import FlatLayout


class GradShardSink:
    """Where the units' full gradients go: reduce-scattered (summed over ranks) into shards.

    ``predivide``: multiply the full gradient by this before the collective (DeepSpeed's
    ``gradient_predivide_factor``, applied as 1 / factor); ``bucket_numel``: at most this many elements
    per collective call (synchronous reductions only; an overlapped one is one call per unit)."""

    def __init__(
        self,
        group: collectives.Group,
        bucket_numel: int | None = None,
        predivide: float | None = None,
        overlap: bool = False,
        max_in_flight: int = 2,
        unit_groups: Mapping[str, collectives.Group] | None = None,
    ) -> None:
        self.group = collectives.resolve_group(group)
        # units reduced over a group of their own (MoE experts over their expert-data-parallel group)
        self.unit_groups = dict(unit_groups or {})
        self.bucket_numel, self.predivide = bucket_numel, predivide
        self.overlap, self.max_in_flight = overlap, max(1, max_in_flight)
        # where ``ShardedBackward`` hands each unit's finished shard: set by whoever accumulates them
        self.deliver: Callable[[str, torch.Tensor], None] | None = None
        # reductions in flight: (work, full buffer kept alive until it is done, shard, what to call then)
        self.pending: list[tuple[collectives.Pending, torch.Tensor, torch.Tensor, Callable]] = []

    def reduce(
        self,
        grad_full: torch.Tensor,
        shard_numel: int,
        then: Callable[[torch.Tensor], None],
        unit: str | None = None,
    ) -> None:
        """``then(shard)`` with this rank's shard [S] of the sum over ranks of ``grad_full`` [N * S]
        (contiguous; scaled in place by the predivide factor): at once, or when an overlapped reduction
        is waited for (``wait()`` waits for all). ``unit``: whose gradient it is (a unit with a group of
        its own is reduced over that group)."""
        group = self.unit_groups.get(unit, self.group)
        if self.predivide is not None:
            grad_full.mul_(self.predivide)
        if not self.overlap:
            then(collectives.reduce_scatter_flat(grad_full, group, self.bucket_numel))
            return
        while len(self.pending) >= self.max_in_flight:  # bound the full buffers kept alive
            self._finish(self.pending.pop(0))
        shard = grad_full.new_empty(shard_numel)
        work = collectives.reduce_scatter_into(shard, grad_full, group, async_op=True)
        if work.done:  # shared memory completes in the call: nothing to keep
            then(shard)
        else:
            self.pending.append((work, grad_full, shard, then))

    @staticmethod
    def _finish(entry: tuple) -> None:
        work, _, shard, then = entry
        work.wait()
        then(shard)

    def wait(self) -> None:
        """Wait for every reduction in flight and hand over its shard (idempotent)."""
        while self.pending:  # in issue order, the same on every rank
            self._finish(self.pending.pop(0))


class ShardedBackward:
    """One backward whose gradients come out as this rank's shard of each unit, summed over ranks.

    ``leaves`` (per unit, one leaf per parameter: views of ``flats``, in layout order) are what the
    forward must read. ``run(loss)`` backpropagates and calls ``deliver(unit, shard [S])`` for each unit
    as soon as its shard is complete (so a caller that adds it into an accumulator never holds this
    micro-batch's shards of every unit either); units the loss never reached deliver zeros (every rank
    still takes part in their reduce-scatter, in layout order)."""

    def __init__(
        self,
        layouts: Mapping[str, FlatLayout],
        flats: Mapping[str, torch.Tensor],
        sink: GradShardSink,
        deliver: Callable[[str, torch.Tensor], None],
    ):
        self.layouts, self.sink, self.deliver = layouts, sink, deliver
        self.leaves = {
            g: [v.detach().requires_grad_(True) for v in layouts[g].split(flat)] for g, flat in flats.items()
        }
        self.buffers: dict[str, torch.Tensor] = {}  # unit -> full gradient [N * S] being assembled
        self.filled: dict[str, set[int]] = {g: set() for g in self.leaves}
        self.reduced: set[str] = set()

    def _buffer(self, g: str) -> torch.Tensor:
        buffer = self.buffers.get(g)
        if buffer is None:
            layout = self.layouts[g]
            leaf = self.leaves[g][0]
            buffer = torch.empty(layout.padded_numel, dtype=leaf.dtype, device=leaf.device)
            layout.zero_padding(buffer)  # gaps and tail: never a parameter, always a zero gradient
            self.buffers[g] = buffer
        return buffer

    def _reduce(self, g: str) -> None:
        self.reduced.add(g)
        buffer = self.buffers.pop(g)
        self.sink.reduce(buffer, self.layouts[g].shard_numel, lambda shard: self.deliver(g, shard), unit=g)

    def _hook_for(self, g: str, index: int):
        entry = self.layouts[g].entries[index]

        def hook(leaf: torch.Tensor) -> None:
            grad, leaf.grad = leaf.grad, None  # released as soon as it is copied
            self._buffer(g)[entry.offset : entry.offset + entry.numel].copy_(grad.reshape(-1))
            self.filled[g].add(index)
            if len(self.filled[g]) == len(self.leaves[g]):
                self._reduce(g)

        return hook

    def run(self, loss: torch.Tensor) -> None:
        handles = [
            leaf.register_post_accumulate_grad_hook(self._hook_for(g, i))
            for g, leaves in self.leaves.items()
            for i, leaf in enumerate(leaves)
        ]
        try:
            inputs = [leaf for leaves in self.leaves.values() for leaf in leaves]
            torch.autograd.backward(loss, inputs=inputs)
            for g in self.layouts:  # units (or parameters) backward never reached, in layout order
                if g in self.reduced:
                    continue
                buffer = self._buffer(g)
                for i, e in enumerate(self.layouts[g].entries):
                    if i not in self.filled[g]:
                        buffer[e.offset : e.offset + e.numel].zero_()
                self._reduce(g)
        finally:
            for handle in handles:
                handle.remove()
            self.sink.wait()  # also after an error: never leave a collective in flight
            self.buffers.clear()
