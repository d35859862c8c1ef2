"""DeepSpeed-Ulysses sequence parallelism: sequence-parallel groups and the all-to-all between layouts.

Ulysses splits the sequence of every sample over the ``P`` ranks of a sequence-parallel group. Outside
attention each rank holds ``T / P`` positions of every head, ``[B, T/P, H, D]``; attention needs every
position of a head, so one all-to-all turns the sequence split into a head split, ``[B, T, H/P, D]``,
local attention runs over whole sequences of ``H / P`` heads, and the inverse all-to-all brings its output
back to ``[B, T/P, H, D]``. Only the exchange is collective; the layouts around it are reshapes.

Groups follow DeepSpeed (``runtime/sequence_parallel/parallel_state_sp.py``, and the ``(data_parallel,
sequence_parallel)`` device mesh, whose inner dimension is the sequence): with ``W`` ranks and
``sequence_parallel_size = P`` the sequence-parallel groups are consecutive blocks ``[0..P-1], [P..2P-1],
...``, and rank ``r`` is data-parallel rank ``r // P`` of ``W / P``: the ranks of one block read the same
samples and split their sequences. Gradients are reduced over the sequence-and-data-parallel group, which
without tensor or pipeline parallelism is every rank (DeepSpeed's ``seq_data_parallel_group``), and
divided by the data-parallel size ``W / P`` (DeepSpeed's ``dp_world_size / sequence_parallel_size``):
summed over the sequence group, averaged over the data-parallel replicas. That is right because each
rank's loss is the whole sequence's loss whose gradient reaches only this rank's positions
(``gather_sequence``, as DeepSpeed's ``vocab_sequence_parallel_cross_entropy``).

The exchange is ``all_to_all_single`` (gloo supports it on CPU, NCCL on GPU) through an autograd function
whose backward is the same exchange: an all-to-all with equal blocks is a permutation of blocks between
ranks, its adjoint the inverse permutation, which the reshapes around it make the inverse all-to-all
(scatter and gather dimensions swapped). Collectives run eagerly (``torch.compiler.disable``): inside a
compiled forward they are graph breaks, as the MoE layer's all-to-all is.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optree
import torch
import torch.distributed as dist

from zerostep.parallel.mesh import sequence_tensor_layout

Group = Any  # a torch.distributed.ProcessGroup (None: one process, no collective)


@dataclass(frozen=True)
class SequenceGroups:
    """This rank's place in a ``(data_parallel, sequence_parallel)`` layout of the world."""

    sp_size: int
    sp_rank: int  # this rank's index in its sequence-parallel group: which chunk of the sequence it holds
    sp_group: Group  # None at sp_size 1 in one process
    sp_ranks: tuple[int, ...]
    dp_size: int  # world // sp_size (// tp_size): the data-parallel replicas
    dp_rank: int  # rank // sp_size: the data-parallel replica, i.e. which samples this rank reads
    tp_size: int = 1  # > 1: laid out with tensor parallelism (sizes above then count tp x sp ranks)


def check_sp_size(sp_size: Any, world_size: int) -> int:
    """``sp_size`` as an int dividing ``world_size``, or a ValueError saying what is wrong."""
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sequence_parallel_size must be a positive integer, got {sp_size!r}")
    if world_size % sp_size:
        raise ValueError(
            f"sequence_parallel_size={sp_size} does not divide the world size {world_size}: every "
            "sequence-parallel group needs sequence_parallel_size ranks"
        )
    return sp_size


def sequence_rank_layout(world_size: int, sp_size: int) -> list[list[int]]:
    """The sequence-parallel groups of ``world_size`` ranks as rank lists (consecutive blocks: the
    tensor-parallel size 1 case of ``parallel/mesh.sequence_tensor_layout``)."""
    check_sp_size(sp_size, world_size)
    return sequence_tensor_layout(world_size, 1, sp_size).sequence


# sp_size -> groups, per default group (a new init_process_group starts over); the latest one is what
# the DeepSpeed-named accessors (zerostep.utils.groups) answer
_GROUPS: weakref.WeakKeyDictionary[Any, dict[int, SequenceGroups]] = weakref.WeakKeyDictionary()
_LATEST: weakref.WeakKeyDictionary[Any, SequenceGroups] = weakref.WeakKeyDictionary()


def initialize_sequence_parallel(sp_size: int, tp_size: int | None = None) -> SequenceGroups:
    """This rank's groups for ``sp_size``, created on the first call (collectively: every rank of the
    default group calls it with the same sizes in the same order; the model does it at construction,
    the engine finds them again). Without ``torch.distributed`` only ``sp_size`` 1 exists.

    ``tp_size`` > 1: with tensor parallelism too, the groups of ``parallel/mesh.sequence_tensor_layout``
    (each sequence group strided by ``tp_size``; ``dp_size`` / ``dp_rank`` count replicas of
    ``tp x sp`` ranks). ``None``: whatever the groups of this ``sp_size`` were made with, else 1. A
    second call with another ``tp_size`` for the same ``sp_size`` is an error (one layout per world)."""
    if not (dist.is_available() and dist.is_initialized()):
        check_sp_size(sp_size, 1)
        if tp_size not in (None, 1):
            raise ValueError(f"tensor-parallel size {tp_size} needs torch.distributed initialized")
        return SequenceGroups(1, 0, None, (0,), 1, 0)
    world, rank = dist.get_world_size(), dist.get_rank()
    check_sp_size(sp_size, world)
    cache = _GROUPS.setdefault(dist.group.WORLD, {})
    made = cache.get(sp_size)
    if made is None:
        tp = 1 if tp_size is None else tp_size
        mine = None
        for ranks in sequence_tensor_layout(world, tp, sp_size).sequence:
            # every rank takes part in every new_group call; sp_size 1 needs no collective at all
            group = dist.new_group(ranks) if sp_size > 1 else None
            if rank in ranks:
                mine = (group, tuple(ranks))
        group, ranks = mine
        replica = tp * sp_size  # ranks of one data-parallel replica
        cache[sp_size] = made = SequenceGroups(
            sp_size, ranks.index(rank), group, ranks, world // replica, rank // replica, tp
        )
    elif tp_size is not None and tp_size != made.tp_size:
        raise ValueError(
            f"sequence_parallel_size={sp_size}: its groups were made for tensor-parallel size "
            f"{made.tp_size}, not {tp_size} (build the model with the training config's "
            "tensor_parallel.autotp_size, e.g. GPTConfig(tensor_parallel_size=...))"
        )
    _LATEST[dist.group.WORLD] = made
    return made


def current_sequence_groups() -> SequenceGroups | None:
    """The groups ``initialize_sequence_parallel`` made or found last in this process, if any."""
    if dist.is_available() and dist.is_initialized():
        return _LATEST.get(dist.group.WORLD)
    return None


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ----------------------------------------------------------------------------------------------
# the exchange


class _BlockExchange(torch.autograd.Function):
    """``all_to_all_single`` of equal blocks along dim 0 (block ``j`` to rank ``j``; block ``i`` of
    the result from rank ``i``). It is its own adjoint, so its backward is the same exchange."""

    @staticmethod
    def forward(ctx: Any, group: Group, x: torch.Tensor) -> torch.Tensor:
        ctx.group = group
        return _exchange(x.contiguous(), group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, _BlockExchange.apply(ctx.group, grad)


def _exchange(x: torch.Tensor, group: Group) -> torch.Tensor:
    # gloo's all_to_all_single moves fp32/fp64/fp16/bf16 and 8/32/64-bit integers (not int16)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _check_dim(x: torch.Tensor, dim: int, what: str) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{what}={dim} is not a dimension of a {x.dim()}-d tensor {tuple(x.shape)}")
    return dim % x.dim()


@torch.compiler.disable  # an eager collective: a graph break under torch.compile
def all_to_all(x: torch.Tensor, group: Group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` into one chunk per rank of ``group``, send chunk ``j`` to rank
    ``j``, and concatenate what arrives along ``gather_dim`` in rank order.

    ``x`` [.., S, .., G, ..] -> [.., S/P, .., P*G, ..] (``S`` at ``scatter_dim``, ``G`` at ``gather_dim``).
    Differentiable: the gradient is ``all_to_all(grad, group, gather_dim, scatter_dim)``. Identity on a
    group of one rank (or ``None``)."""
    scatter_dim, gather_dim = (
        _check_dim(x, scatter_dim, "scatter_dim"),
        _check_dim(x, gather_dim, "gather_dim"),
    )
    if scatter_dim == gather_dim:
        raise ValueError(f"scatter_dim and gather_dim must differ, both are {scatter_dim}")
    size = group_size(group)
    if size == 1:
        return x
    shape = list(x.shape)
    if shape[scatter_dim] % size:
        raise ValueError(
            f"cannot split dimension {scatter_dim} of size {shape[scatter_dim]} (shape {tuple(shape)}) over "
            f"the {size} ranks of the sequence-parallel group: it must be divisible by {size}"
        )
    # [.., S, ..] -> [.., P, S/P, ..] -> [P, .., S/P, ..]: block j is what rank j gets
    split = shape[:scatter_dim] + [size, shape[scatter_dim] // size] + shape[scatter_dim + 1 :]
    blocks = x.reshape(split).movedim(scatter_dim, 0)
    received = _BlockExchange.apply(group, blocks)  # [P, .., S/P, ..], block i from rank i
    # [P, .., G, ..] -> [.., P, G, ..] -> [.., P*G, ..]: rank i's chunk i of the gathered dimension
    local = shape[:scatter_dim] + [shape[scatter_dim] // size] + shape[scatter_dim + 1 :]
    merged = local[:gather_dim] + [size * local[gather_dim]] + local[gather_dim + 1 :]
    return received.movedim(0, gather_dim).reshape(merged)


def sequence_to_heads(x: torch.Tensor, group: Group, seq_dim: int = 1, head_dim: int = 2) -> torch.Tensor:
    """[B, T/P, H, D] -> [B, T, H/P, D] (dims as given): the whole sequence of this rank's heads."""
    heads = x.shape[head_dim]
    size = group_size(group)
    if heads % size:
        raise ValueError(
            f"{heads} attention heads (dim {head_dim} of {tuple(x.shape)}) cannot be split over the "
            f"{size} ranks of the sequence-parallel group: the number of heads must be divisible by "
            f"sequence_parallel_size={size}"
        )
    return all_to_all(x, group, head_dim, seq_dim)


def heads_to_sequence(x: torch.Tensor, group: Group, seq_dim: int = 1, head_dim: int = 2) -> torch.Tensor:
    """[B, T, H/P, D] -> [B, T/P, H, D]: the inverse of ``sequence_to_heads``."""
    return all_to_all(x, group, seq_dim, head_dim)


# ----------------------------------------------------------------------------------------------
# the sequence outside attention


def sequence_chunk(x: torch.Tensor, groups: SequenceGroups, dim: int = 1) -> torch.Tensor:
    """This rank's ``1 / sp_size`` of ``x`` along ``dim`` (a view), with a clear error when the length
    does not split evenly."""
    dim = _check_dim(x, dim, "dim")
    length, size = x.shape[dim], groups.sp_size
    if length % size:
        raise ValueError(
            f"sequence length {length} (dim {dim} of {tuple(x.shape)}) is not divisible by "
            f"sequence_parallel_size={size}: every rank of the group must get the same number of positions"
        )
    return x.narrow(dim, groups.sp_rank * (length // size), length // size)


def split_sequence(batch: Any, groups: SequenceGroups, dim: int = 1) -> Any:
    """Every tensor leaf of ``batch`` (a pytree) cut to this rank's chunk along ``dim`` (the sequence:
    dim 1 of ``[B, T, ...]``); what Megatron-DeepSpeed's ``get_batch`` and DeepSpeed's
    ``UlyssesSPDataLoaderAdapter`` do before the model sees a batch. Leaves with fewer than ``dim + 1``
    dimensions (per-sample scalars) stay whole."""

    def cut(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > dim:
            return sequence_chunk(leaf, groups, dim)
        return leaf

    return optree.tree_map(cut, batch, none_is_leaf=True)


@torch.compiler.disable  # an eager collective
def gather_sequence(local: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """The whole sequence from every rank's chunk ``local`` (concatenated along ``dim`` in rank order),
    differentiable w.r.t. ``local`` only: the gradient of the result's slice this rank contributed,
    not its sum over ranks. Every rank then computes the same value (e.g. the whole sequence's mean
    loss) and back-propagates only into its own positions; summing gradients over the group, as the
    engine does at ``sequence_parallel_size > 1``, gives the gradient of that value."""
    size = group_size(group)
    if size == 1:
        return local
    dim = _check_dim(local, dim, "dim")
    pieces = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(pieces, local.detach().contiguous(), group=group)
    pieces[group_rank(group)] = local  # the one piece autograd sees
    return torch.cat(pieces, dim=dim)


def sequence_parallel_loss(
    local_loss: torch.Tensor, group: Group, weight: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """The group's loss from each rank's mean loss over its chunk, weighted by ``weight`` (e.g. this
    rank's count of counted tokens): value ``sum_i w_i l_i / sum_i w_i`` on every rank, gradient this
    rank's share ``w_r / sum_i w_i * dl_r`` (the DeepSpeed pattern of all-reducing the weighted loss
    outside autograd). Summed over the group by the engine, the shares give the group loss's gradient."""
    size = group_size(group)
    if size == 1:
        return local_loss
    w = torch.as_tensor(weight, dtype=torch.float32, device=local_loss.device).reshape(())
    totals = _all_reduce_sum(torch.stack([local_loss.detach().float() * w, w]), group)
    share = local_loss * (w / totals[1]).to(local_loss.dtype)
    return share + (totals[0] / totals[1]).to(local_loss.dtype) - share.detach()


@torch.compiler.disable
def _all_reduce_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


def attention_over_heads(
    local_attention: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Group,
    seq_dim: int = 1,
    head_dim: int = 2,
    args: tuple = (),
    kwargs: dict | None = None,
) -> torch.Tensor:
    """Ulysses attention: q, k, v [.., T/P, .., H, ..] to the head split, ``local_attention`` over whole
    sequences of ``H / P`` heads, its output back to the sequence split."""
    # three calls, not a generator: dynamo skips a whole frame whose generator hits a graph break
    q = sequence_to_heads(q, group, seq_dim, head_dim)
    k = sequence_to_heads(k, group, seq_dim, head_dim)
    v = sequence_to_heads(v, group, seq_dim, head_dim)
    out = local_attention(q, k, v, *args, **(kwargs or {}))
    return heads_to_sequence(out, group, seq_dim, head_dim)
