"""Flat-buffer collectives as functional collectives that ``torch.compile`` traces, and their byte accounting.

The three collectives ZeRO needs, over 1-D flat buffers laid out by ``FlatLayout``:

- ``all_reduce_flat(flat)``: the sum over ranks of ``flat`` [P] (stages 0-1 gradients).
- ``reduce_scatter_flat(flat)``: this rank's shard [P / N] of that sum, shard ``r`` being
  ``flat[r * S:(r + 1) * S]`` exactly as ``FlatLayout.shard`` (stages 2-3 gradients).
- ``all_gather_flat(shard)``: the full buffer [N * S] from every rank's shard [S] (updated parameters).

Under ``torch.compile`` they are ``torch.distributed._functional_collectives`` (``funcol``): collectives
that return new tensors, so dynamo puts them in the graph (``fullgraph=True`` works with gloo on CPU)
instead of breaking on ``dist.*`` calls. In eager mode the same results come from in-place c10d
collectives into freshly allocated outputs (cheaper; see ``_eager``). Either way the input is left
unchanged and the result is a new tensor (except at world size 1). Reductions are sums; the engine scales.

Buckets (DeepSpeed's ``reduce_bucket_size`` / ``allgather_bucket_size``, in elements) bound how much one
collective call moves. Bucketing must not change which elements a rank owns, so a padded buffer is
viewed as ``[N, S]`` (row ``r`` is rank ``r``'s shard) and cut along ``S``: bucket ``b`` is the columns
``[c0, c1)`` of every row, i.e. the same slice of every rank's shard.

At world size 1 every function is the identity and issues no collective.

Gloo (CPU) gets other algorithms for the two ZeRO collectives, because its own are slow: its
reduce-scatter moves an all-reduce's bytes, and its all-gather copies through a list. Measured for 16 MB
fp32 on 2 ranks here: reduce-scatter 15.6 ms, as an ``all_to_all_single`` plus a local sum of the received
rows 7.0 ms; all-gather 8.7 ms, as one broadcast per rank 5.4 ms (gloo's all-reduce: 13.1 ms). Both move
the bytes of a ring algorithm. ``reduce_scatter_into`` / ``all_gather_into`` (into preallocated outputs,
optionally async, for the overlapped reducer and stage 3) and the ``*_flat`` functions (eager and traced)
pick the algorithm by backend; ``ZEROSTEP_GLOO_COLLECTIVES=native`` keeps gloo's own (for comparison).

Faster still, when a gloo group's ranks share a host: ``attach_shared_memory(group)`` (the engine calls
it) gives the group a ``SharedMemoryChannel`` (``parallel/shm.py``), and every eager collective on it,
``all_reduce_into``, ``reduce_scatter_into``, ``all_gather_rows`` and the eager ``*_flat``, then copies
through ``/dev/shm`` instead of loopback TCP (16 MB all-reduce on 2 ranks: 4.0 ms against 13.8 ms). Those
run to completion in the calling thread, so their ``async_op`` handles come back already done; traced
code keeps the functional collectives, which the engine therefore does not compile around such a group.

Communication accounting (``CommPlan``, ``CommCounter``) uses the convention of the ZeRO paper: the
bytes one rank sends in a bandwidth-optimal (ring) algorithm, with the ``(N - 1) / N`` factor dropped.
For a flat buffer of ``B`` bytes a reduce-scatter counts ``B``, an all-gather (of a ``B``-byte result)
counts ``B``, and an all-reduce counts ``2B`` (it is a reduce-scatter followed by an all-gather). With
``Ψ`` parameters in units of ``Ψ * itemsize`` bytes this reproduces DESIGN.md's table: stage 0 all-reduces
the gradients (``2Ψ``), stages 1-2 reduce-scatter gradients and all-gather parameters (``Ψ + Ψ``),
stage 3 all-gathers parameters in forward and in backward and reduce-scatters gradients (``3Ψ``).
Collectives at world size 1 count 0. Bytes are computed from shapes only, so they are right even when the
collective runs inside a compiled graph (where Python code runs only at trace time): the engine builds a
``CommPlan`` once and ``CommCounter.record``s it per step on the host.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from zerostep.parallel.shm import SharedMemoryChannel

Group = dist.ProcessGroup | None


def _funcol():
    """``torch.distributed._functional_collectives``, imported when a step is first traced: importing it
    imports ``torch._dynamo`` (1.8 s per process), which eager ranks never need."""
    import torch.distributed._functional_collectives as funcol

    return funcol


# torch 2.13 renamed the tensor collectives to ``*_single`` (the old names warn); 2.11 has only the old ones.
def _reduce_scatter(flat: torch.Tensor, op: str, dim: int, group: Group) -> torch.Tensor:
    funcol = _funcol()
    return getattr(funcol, "reduce_scatter_single", funcol.reduce_scatter_tensor)(flat, op, dim, group)


def _all_gather(shard: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    funcol = _funcol()
    return getattr(funcol, "all_gather_single", funcol.all_gather_tensor)(shard, dim, group)


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` at import time: the
    decorator only marks the function (tests/test_collectives.py checks the mark is still torch's)."""
    fn._dynamo_marked_constant = True
    return fn


# Same rename for the in-place c10d ops used in eager mode.
c10d_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
c10d_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)

# ---------------------------------------------------------------------------------------------------------
# Groups and buckets
# ---------------------------------------------------------------------------------------------------------


def resolve_group(group: Group) -> dist.ProcessGroup | None:
    """``None`` means the default group when distributed is up, and a single rank otherwise."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def group_size(group: Group) -> int:
    group = resolve_group(group)
    return 1 if group is None else dist.get_world_size(group)


def bucket_bounds(length: int, bucket_len: int | None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``[0, length)`` in pieces of at most ``bucket_len`` (one if None)."""
    if bucket_len is None or bucket_len >= length:
        return [(0, length)]
    if bucket_len < 1:
        raise ValueError(f"bucket length must be >= 1, got {bucket_len}")
    return [(start, min(start + bucket_len, length)) for start in range(0, length, bucket_len)]


def shard_bucket_columns(
    shard_numel: int, world_size: int, bucket_numel: int | None
) -> list[tuple[int, int]]:
    """Column ranges of the ``[N, S]`` view for sharded buckets of about ``bucket_numel`` elements each.

    A bucket holds ``N`` rows of ``width`` columns, so ``width = bucket_numel // N`` (at least one column).
    """
    width = None if bucket_numel is None else max(1, int(bucket_numel) // world_size)
    return bucket_bounds(shard_numel, width)


def _check_padded(flat: torch.Tensor, world_size: int) -> int:
    if flat.dim() != 1:
        raise ValueError(f"expected a 1-D flat buffer, got shape {tuple(flat.shape)}")
    if flat.numel() % world_size:
        raise ValueError(
            f"flat buffer of {flat.numel()} elements is not padded to a multiple of world size {world_size}"
        )
    return flat.numel() // world_size


# ---------------------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------------------


class Pending:
    """The handle of one logical collective started with ``async_op=True``: the c10d works it issued and
    a local step to run once they are done (the gloo reduce-scatter's sum of the received rows).
    ``wait()`` is idempotent, like c10d's."""

    def __init__(self, works: list, finish: Callable[[], None] | None = None) -> None:
        self.works, self.finish = works, finish

    @property
    def done(self) -> bool:
        """Nothing left to wait for (a shared-memory collective's handle comes back done)."""
        return not self.works and self.finish is None

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        self.works = []
        if self.finish is not None:
            finish, self.finish = self.finish, None
            finish()
        return True


def _gloo_native_requested() -> bool:
    """``ZEROSTEP_GLOO_COLLECTIVES=native``: gloo's own collectives and transport, for comparison."""
    return os.environ.get("ZEROSTEP_GLOO_COLLECTIVES", "").lower() == "native"


@_assume_constant_result
def uses_exchange_algorithms(group: dist.ProcessGroup) -> bool:
    """Whether ``group``'s reduce-scatter and all-gather run as all-to-all + sum and broadcasts (gloo)."""
    return not _gloo_native_requested() and dist.get_backend(group) == dist.Backend.GLOO


# Weak keys: a group that is destroyed and dropped takes its channel (and the mapped memory) with it.
_channels: weakref.WeakKeyDictionary[dist.ProcessGroup, SharedMemoryChannel] = weakref.WeakKeyDictionary()


def attach_shared_memory(group: Group = None, slot_bytes: int | None = None) -> bool:
    """Route ``group``'s eager collectives through shared memory when it is a gloo group whose ranks share
    this host (``parallel/shm.py``); whether they now do. Collective: every rank of the group calls it,
    and all get the same answer. Idempotent. ``ZEROSTEP_SHM=0`` or ``ZEROSTEP_GLOO_COLLECTIVES=native``
    keeps gloo's transport. ``slot_bytes``: each message buffer's size (default
    ``$ZEROSTEP_SHM_SLOT_BYTES`` or 32 MiB; larger messages go in pieces)."""
    group = resolve_group(group)
    if group is None or dist.get_world_size(group) < 2 or dist.get_backend(group) != dist.Backend.GLOO:
        return False
    if group in _channels:
        return True
    allowed = not _gloo_native_requested()
    channel = SharedMemoryChannel.attach(group, slot_bytes, allowed=allowed)  # one vote for all ranks
    if channel is not None:
        _channels[group] = channel
    return channel is not None


def detach_shared_memory(group: Group = None) -> None:
    """Back to gloo's transport for ``group`` (collective, like ``attach_shared_memory``)."""
    channel = _channels.pop(resolve_group(group), None)
    if channel is not None:
        channel.barrier()  # no rank unmaps while a peer may still read its buffers
        channel.close()


def shared_memory_channel(group: Group = None) -> SharedMemoryChannel | None:
    """The channel ``attach_shared_memory`` gave ``group``, if any."""
    return _channels.get(resolve_group(group)) if _channels else None


_DONE = Pending([])

# The comms logger (core/monitoring/comms_logger.py) while it records, else None: the eager primitives
# below check it once per call, so a run without the logger pays nothing else (it is set by
# ``zerostep.comm.configure`` / the config's ``comms_logger`` block).
comms_log = None  # a CommsLogger while it records


def _hand_over(pending: Pending, async_op: bool) -> Pending | None:
    """The handle for an async call; otherwise wait here and return None (c10d's convention)."""
    if async_op:
        return pending
    pending.wait()
    return None


def _logged(
    kind: str, tensor: torch.Tensor, group: Group, issue: Callable[[], Pending], async_op: bool
) -> Pending | None:
    """Issue a collective under the comms logger: timed to completion, ``tensor``'s bytes recorded."""
    pending = comms_log.time(kind, tensor.numel() * tensor.element_size(), group, issue, tensor.device)
    return _hand_over(pending, async_op)


def reduce_scatter_into(
    out: torch.Tensor, flat: torch.Tensor, group: Group = None, async_op: bool = False
) -> Pending | None:
    """``out`` [S] = this rank's shard of the sum over ranks of ``flat`` [N * S] (contiguous)."""
    group = resolve_group(group)
    if comms_log is not None:  # message: this rank's shard, as DeepSpeed counts reduce_scatter
        return _logged("reduce_scatter", out, group, lambda: _reduce_scatter_into(out, flat, group), async_op)
    return _hand_over(_reduce_scatter_into(out, flat, group), async_op)


def _reduce_scatter_into(out: torch.Tensor, flat: torch.Tensor, group: Group) -> Pending:
    channel = shared_memory_channel(group)
    if channel is not None:
        channel.reduce_scatter_into(out, flat)
        return _DONE
    if not uses_exchange_algorithms(group):
        return Pending([c10d_reduce_scatter(out, flat, group=group, async_op=True)])
    world_size = dist.get_world_size(group)
    received = torch.empty_like(flat)  # [N * S]: row r is rank r's copy of this rank's shard
    work = dist.all_to_all_single(received, flat, group=group, async_op=True)

    def finish() -> None:
        torch.sum(received.view(world_size, -1), dim=0, out=out)

    return Pending([work], finish)


def all_gather_into(
    out: torch.Tensor,
    shard: torch.Tensor,
    group: Group = None,
    async_op: bool = False,
    bucket_numel: int | None = None,
) -> Pending | None:
    """``out`` [N * S] = every rank's ``shard`` [S] in rank order (``shard`` may be ``out``'s own row):
    ``shard`` goes into this rank's row, then ``all_gather_rows``."""
    group = resolve_group(group)
    mine = out.view(dist.get_world_size(group), -1)[dist.get_rank(group)]
    if mine.data_ptr() != shard.data_ptr():
        mine.copy_(shard)
    return all_gather_rows(out, group, bucket_numel, async_op)


def all_gather_rows(
    full: torch.Tensor, group: Group = None, bucket_numel: int | None = None, async_op: bool = False
) -> Pending | None:
    """Fill ``full`` [N * S] with every rank's row, in place: row ``rank`` already holds this rank's
    shard (the optimizer wrote it there), so nothing is copied in or out. Buckets cut every row's
    columns alike, as in ``all_gather_flat``."""
    group = resolve_group(group)
    if comms_log is not None:  # message: this rank's row, as DeepSpeed counts all_gather
        row = full.view(dist.get_world_size(group), -1)[0]
        issue = lambda: _all_gather_rows(full, group, bucket_numel)  # noqa: E731
        return _logged("all_gather", row, group, issue, async_op)
    return _hand_over(_all_gather_rows(full, group, bucket_numel), async_op)


def _all_gather_rows(full: torch.Tensor, group: Group, bucket_numel: int | None) -> Pending:
    channel = shared_memory_channel(group)
    if channel is not None:
        channel.all_gather_rows(full)
        return _DONE
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = full.view(world_size, -1)  # [N, S]
    columns = shard_bucket_columns(rows.shape[1], world_size, bucket_numel)
    works, finish = [], []
    if uses_exchange_algorithms(group):
        for c0, c1 in columns:
            works += [
                dist.broadcast(rows[r, c0:c1], group_src=r, group=group, async_op=True)
                for r in range(world_size)
            ]
    else:
        in_place = dist.get_backend(group) == dist.Backend.NCCL  # NCCL supports an input inside the output
        for c0, c1 in columns:
            mine = rows[rank, c0:c1] if in_place else rows[rank, c0:c1].clone()
            if len(columns) == 1:
                works.append(c10d_all_gather(full, mine, group=group, async_op=True))
                continue
            gathered = full.new_empty(world_size, c1 - c0)  # [N, w]
            works.append(c10d_all_gather(gathered.view(-1), mine.contiguous(), group=group, async_op=True))
            # ``.data``: this copy may run inside the next forward (a deferred wait), where bumping the
            # version counter of a buffer that autograd has views of would fail the backward
            finish.append(lambda c0=c0, c1=c1, gathered=gathered: rows.data[:, c0:c1].copy_(gathered))
    return Pending(works, (lambda: [f() for f in finish]) if finish else None)


def all_reduce_into(flat: torch.Tensor, group: Group = None, async_op: bool = False) -> Pending | None:
    """``flat`` [P] (contiguous) = its sum over the group's ranks, in place."""
    group = resolve_group(group)
    if comms_log is not None:
        return _logged("all_reduce", flat, group, lambda: _all_reduce_into(flat, group), async_op)
    return _hand_over(_all_reduce_into(flat, group), async_op)


def _all_reduce_into(flat: torch.Tensor, group: Group) -> Pending:
    channel = shared_memory_channel(group)
    if channel is not None:
        channel.all_reduce_(flat)
        return _DONE
    return Pending([dist.all_reduce(flat, group=group, async_op=True)])


def _traced_reduce_scatter(flat: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    funcol = _funcol()
    if not uses_exchange_algorithms(group):
        return funcol.wait_tensor(_reduce_scatter(flat, "sum", 0, group))
    received = funcol.wait_tensor(funcol.all_to_all_single(flat, None, None, group))
    return received.view(dist.get_world_size(group), -1).sum(dim=0)


def _traced_all_gather(shard: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    funcol = _funcol()
    if not uses_exchange_algorithms(group):
        return funcol.wait_tensor(_all_gather(shard, 0, group))
    # funcol's broadcast takes the group rank; on other ranks ``shard`` only gives the shape
    rows = [funcol.broadcast(shard, r, group) for r in range(dist.get_world_size(group))]
    return torch.cat([funcol.wait_tensor(row) for row in rows])


def _eager() -> bool:
    """Outside ``torch.compile``: use in-place c10d ops into preallocated outputs.

    They skip funcol's wrapper tensors and its first-call import of ``torch._dynamo`` (seconds per process),
    and write bucket results straight into the output instead of concatenating. Under tracing this is
    constant-folded to False and the functional collectives go into the graph.
    """
    return not torch.compiler.is_compiling()


def all_reduce_flat(flat: torch.Tensor, group: Group = None, bucket_numel: int | None = None) -> torch.Tensor:
    """Sum of ``flat`` [P] over the group's ranks, as a new tensor [P]; buckets of ``bucket_numel``."""
    group = resolve_group(group)
    if group is None or dist.get_world_size(group) == 1:
        return flat
    buckets = bucket_bounds(flat.numel(), bucket_numel)
    if _eager():
        out = flat.clone()
        for start, end in buckets:
            all_reduce_into(out[start:end], group)  # a 1-D slice of a contiguous buffer is contiguous
        return out
    funcol = _funcol()
    pieces = [funcol.wait_tensor(funcol.all_reduce(flat[start:end], "sum", group)) for start, end in buckets]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def reduce_scatter_flat(
    flat: torch.Tensor, group: Group = None, bucket_numel: int | None = None
) -> torch.Tensor:
    """This rank's shard [S] of the sum over ranks of ``flat`` [N * S]: rows ``r * S:(r + 1) * S``."""
    group = resolve_group(group)
    if group is None or dist.get_world_size(group) == 1:
        return flat
    world_size = dist.get_world_size(group)
    shard_numel = _check_padded(flat, world_size)
    columns = shard_bucket_columns(shard_numel, world_size, bucket_numel)
    eager = _eager()
    if len(columns) == 1:
        if eager:
            out = flat.new_empty(shard_numel)
            reduce_scatter_into(out, flat.contiguous(), group)
            return out
        return _traced_reduce_scatter(flat, group)
    rows = flat.view(world_size, shard_numel)  # [N, S]: row r is rank r's shard
    out = flat.new_empty(shard_numel) if eager else None
    pieces = []
    for c0, c1 in columns:
        # [N, c1 - c0] -> contiguous [N * (c1 - c0)]: rank r receives the sum of row r's columns
        bucket = rows[:, c0:c1].contiguous().view(-1)
        if eager:
            reduce_scatter_into(out[c0:c1], bucket, group)
        else:
            pieces.append(_traced_reduce_scatter(bucket, group))
    return out if eager else torch.cat(pieces)  # [S]


def all_gather_flat(
    shard: torch.Tensor, group: Group = None, bucket_numel: int | None = None
) -> torch.Tensor:
    """The full buffer [N * S] whose row ``r`` is rank ``r``'s ``shard`` [S]."""
    group = resolve_group(group)
    if group is None or dist.get_world_size(group) == 1:
        return shard
    world_size = dist.get_world_size(group)
    if shard.dim() != 1:
        raise ValueError(f"expected a 1-D shard, got shape {tuple(shard.shape)}")
    shard_numel = shard.numel()
    if _eager():  # buckets are all_gather_rows' business
        out = shard.new_empty(world_size * shard_numel)
        all_gather_into(out, shard.contiguous(), group, bucket_numel=bucket_numel)
        return out
    columns = shard_bucket_columns(shard_numel, world_size, bucket_numel)
    if len(columns) == 1:
        return _traced_all_gather(shard.contiguous(), group)
    # gathered [N * w] -> [N, w]: row r holds rank r's columns c0:c1
    pieces = [
        _traced_all_gather(shard[c0:c1].contiguous(), group).view(world_size, c1 - c0) for c0, c1 in columns
    ]
    return torch.cat(pieces, dim=1).view(-1)  # [N, S] -> [N * S]


def all_to_all_flat(
    send: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Group = None
) -> torch.Tensor:
    """Uneven all-to-all of 1-D buffers: ``send`` [sum(send_splits)] holds, in rank order, the
    ``send_splits[q]`` elements for rank ``q``; returns [sum(recv_splits)], rank ``q``'s elements for
    this rank in rank order (Muon's owner strategy). Plain c10d/funcol, also on a shared-memory group;
    eager calls are recorded by the comms logger."""
    group = resolve_group(group)
    if group is None or dist.get_world_size(group) == 1:
        return send
    if _eager():
        out, send = send.new_empty(sum(recv_splits)), send.contiguous()

        def issue() -> Pending:
            work = dist.all_to_all_single(out, send, recv_splits, send_splits, group, async_op=True)
            return Pending([work])

        if comms_log is not None:  # message: what this rank sends
            _logged("all_to_all_single", send, group, issue, False)
        else:
            _hand_over(issue(), False)
        return out
    funcol = _funcol()
    return funcol.wait_tensor(funcol.all_to_all_single(send.contiguous(), recv_splits, send_splits, group))


# ---------------------------------------------------------------------------------------------------------
# Byte accounting (static: from shapes, never from traced code)
# ---------------------------------------------------------------------------------------------------------

ALL_REDUCE, REDUCE_SCATTER, ALL_GATHER = "all_reduce", "reduce_scatter", "all_gather"
ALL_TO_ALL = "all_to_all"  # counts the bytes this rank sends


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def all_reduce_bytes(numel: int, dtype: torch.dtype, world_size: int) -> int:
    """An all-reduce of ``numel`` elements counts twice the buffer's bytes (reduce-scatter + all-gather)."""
    return 0 if world_size <= 1 else 2 * numel * _itemsize(dtype)


def reduce_scatter_bytes(padded_numel: int, dtype: torch.dtype, world_size: int) -> int:
    """A reduce-scatter of a full buffer of ``padded_numel`` elements counts the buffer's bytes."""
    return 0 if world_size <= 1 else padded_numel * _itemsize(dtype)


def all_gather_bytes(padded_numel: int, dtype: torch.dtype, world_size: int) -> int:
    """An all-gather producing ``padded_numel`` elements counts the gathered buffer's bytes."""
    return 0 if world_size <= 1 else padded_numel * _itemsize(dtype)


@dataclass(frozen=True)
class CommOp:
    """One collective kind over one buffer: ``calls`` collective calls (buckets) moving ``nbytes`` in all."""

    kind: str
    nbytes: int
    calls: int = 1


@dataclass(frozen=True)
class CommPlan:
    """The collectives one step issues, known from shapes before anything runs."""

    ops: tuple[CommOp, ...] = ()

    def __add__(self, other: CommPlan) -> CommPlan:
        return CommPlan(self.ops + other.ops)

    def times(self, n: int) -> CommPlan:
        """This plan repeated ``n`` times (e.g. once per micro-batch)."""
        return CommPlan(self.ops * n)

    @property
    def total_bytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    @property
    def calls(self) -> int:
        return sum(op.calls for op in self.ops)

    def bytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            out[op.kind] = out.get(op.kind, 0) + op.nbytes
        return out


def all_reduce_plan(
    numel: int, dtype: torch.dtype, world_size: int, bucket_numel: int | None = None
) -> CommPlan:
    if world_size <= 1:
        return CommPlan()
    calls = len(bucket_bounds(numel, bucket_numel))
    return CommPlan((CommOp(ALL_REDUCE, all_reduce_bytes(numel, dtype, world_size), calls),))


def reduce_scatter_plan(
    padded_numel: int, dtype: torch.dtype, world_size: int, bucket_numel: int | None = None
) -> CommPlan:
    if world_size <= 1:
        return CommPlan()
    calls = len(shard_bucket_columns(padded_numel // world_size, world_size, bucket_numel))
    return CommPlan((CommOp(REDUCE_SCATTER, reduce_scatter_bytes(padded_numel, dtype, world_size), calls),))


def all_gather_plan(
    padded_numel: int, dtype: torch.dtype, world_size: int, bucket_numel: int | None = None
) -> CommPlan:
    if world_size <= 1:
        return CommPlan()
    calls = len(shard_bucket_columns(padded_numel // world_size, world_size, bucket_numel))
    return CommPlan((CommOp(ALL_GATHER, all_gather_bytes(padded_numel, dtype, world_size), calls),))


@dataclass
class CommCounter:
    """Host-side running totals; the engine calls ``record(plan)`` once per step it executes."""

    steps: int = 0
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    calls_by_kind: dict[str, int] = field(default_factory=dict)

    def record(self, plan: CommPlan, steps: int = 1) -> None:
        self.steps += steps
        for op in plan.ops:
            self.bytes_by_kind[op.kind] = self.bytes_by_kind.get(op.kind, 0) + op.nbytes * steps
            self.calls_by_kind[op.kind] = self.calls_by_kind.get(op.kind, 0) + op.calls * steps

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_kind.values())

    @property
    def bytes_per_step(self) -> float:
        return self.total_bytes / self.steps if self.steps else 0.0

    def reset(self) -> None:
        self.steps = 0
        self.bytes_by_kind.clear()
        self.calls_by_kind.clear()
