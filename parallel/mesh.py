"""The data-parallel x model-parallel mesh the engine trains over.

Every rank belongs to one data-parallel (DP) group, over which gradients are reduced, ZeRO shards its
buffers, the ranks agree on the plan and the loss is averaged, and to one model-parallel group (MP:
tensor parallelism here, or whatever a Megatron ``mpu`` calls its model-parallel group), whose ranks
hold different parts of one model replica and see the same batch. The engine asks the mesh for both
instead of assuming the world is one data-parallel group.

Three ways to get one, all with Megatron's / DeepSpeed's layout (model-parallel ranks consecutive:
with world 8 and MP 2, the MP groups are {0,1} {2,3} ..., the DP groups {0,2,4,6} and {1,3,5,7}):

- ``world_mesh()``: the default, the whole world data-parallel (MP size 1);
- ``tensor_parallel_mesh(tp_size)``: the config's ``tensor_parallel.autotp_size`` (collective: it
  creates the groups);
- ``mesh_from_mpu(mpu)``: the groups of a Megatron model-parallel unit passed to ``initialize(mpu=)``.

``counts_replicated`` says whether this rank adds model-parallel-*replicated* parameters (layer norms,
biases of row-parallel layers...) to the global gradient norm: only MP rank 0 does, as DeepSpeed's
``is_model_parallel_parameter`` rule, so the sum over the MP group counts each such parameter once and
each sharded one once per shard.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch.distributed as dist

from zerostep.parallel.groups import block_layout

# Megatron's model-parallel unit, as DeepSpeed's engine and ZeRO call it (utils/groups.py, bwc.py).
MPU_METHODS = (
    "get_model_parallel_rank",
    "get_model_parallel_world_size",
    "get_model_parallel_group",
    "get_data_parallel_group",
    "get_data_parallel_rank",
    "get_data_parallel_world_size",
)

_created: dict[tuple[int, int], tuple[Any, Any, Any]] = {}  # (id(world), tp) -> this rank's groups


@dataclass(frozen=True)
class ParallelMesh:
    """This rank's place in the DP x MP grid, and the groups over it.

    ``dp_group`` / ``tp_group`` are ``None`` for a size-1 axis (no collective to run). ``dp_ranks``: the
    global ranks of this rank's DP group, in DP-rank order. ``ckpt_group``: a dedicated gloo group over
    the DP group for checkpoint coordination (``zerostep.io``), set when the DP group is not the world.
    """

    dp_group: Any
    dp_rank: int
    dp_size: int
    dp_ranks: tuple[int, ...]
    tp_group: Any
    tp_rank: int
    tp_size: int
    world_rank: int
    world_size: int
    counts_replicated: bool = True
    source: str = "world"  # "world", "tensor_parallel" or "mpu"
    ckpt_group: Any = None

    @property
    def is_world(self) -> bool:
        """The default layout: every rank data-parallel."""
        return self.tp_size == 1 and self.dp_size == self.world_size

    def describe(self) -> str:
        return (
            f"data-parallel rank {self.dp_rank} of {self.dp_size}, model-parallel rank {self.tp_rank} of "
            f"{self.tp_size} (global rank {self.world_rank} of {self.world_size}, from {self.source})"
        )


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_mesh() -> ParallelMesh:
    """Every rank data-parallel over the default group (one rank: no groups at all)."""
    rank, world = _world()
    group = dist.group.WORLD if world > 1 or (dist.is_available() and dist.is_initialized()) else None
    return ParallelMesh(group, rank, world, tuple(range(world)), None, 0, 1, rank, world)


def check_tp_size(tp_size: int, world_size: int, what: str = "tensor_parallel.autotp_size") -> None:
    """``tp_size`` must be a positive divisor of the world: a clear error otherwise."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"{what} = {tp_size!r}: must be a positive integer")
    if world_size % tp_size:
        raise ValueError(
            f"{what} = {tp_size} does not divide the world size {world_size}: the ranks form "
            f"world / tp data-parallel replicas of tp ranks each"
        )


def layout(tp_size: int, world_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(TP groups, DP groups) as lists of global ranks: TP ranks consecutive, DP ranks strided."""
    check_tp_size(tp_size, world_size)
    return block_layout(world_size, tp_size)


class SequenceTensorLayout(NamedTuple):
    """The groups of ``world = dp x sp x tp`` ranks with both Ulysses sequence parallelism and tensor
    parallelism, as lists of global ranks, in Megatron's ``tp-cp-dp`` order (DeepSpeed builds no mesh
    of both; its AutoTP mesh keeps TP ranks consecutive and its Ulysses mesh makes a sequence group of
    the ranks of one data-parallel replica, which this order keeps for both):

    - ``tensor``: ``tp`` consecutive ranks (one model replica's shards of one sequence chunk);
    - ``sequence``: in each block of ``tp x sp`` consecutive ranks, those of one TP rank (strided by
      ``tp``): the ranks that all-to-all a head shard's sequence chunks;
    - ``data``: the ranks at one (TP rank, SP rank), strided by ``tp x sp``: data-parallel replicas;
    - ``sequence_data``: all ranks of one TP rank (strided by ``tp``), the group gradients of this
      rank's shards are reduced and ZeRO-sharded over (DeepSpeed's sequence-and-data group); it is
      ``layout(tp, world)``'s data-parallel group, so the TP mesh's DP group serves unchanged.

    world 8, tp 2, sp 2: tensor {0,1} {2,3} {4,5} {6,7}; sequence {0,2} {1,3} {4,6} {5,7};
    data {0,4} {1,5} {2,6} {3,7}; sequence_data {0,2,4,6} {1,3,5,7}.
    """

    tensor: list[list[int]]
    sequence: list[list[int]]
    data: list[list[int]]
    sequence_data: list[list[int]]


def sequence_tensor_layout(world_size: int, tp_size: int, sp_size: int) -> SequenceTensorLayout:
    """The groups of ``SequenceTensorLayout`` for ``world_size`` ranks; ``tp_size x sp_size`` must
    divide the world (a clear error naming the sizes otherwise)."""
    check_tp_size(tp_size, world_size)
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sequence_parallel_size = {sp_size!r}: must be a positive integer")
    if world_size % (tp_size * sp_size):
        raise ValueError(
            f"tensor_parallel.autotp_size x sequence_parallel_size = {tp_size} x {sp_size} does not "
            f"divide the world size {world_size}: the ranks form world / (tp x sp) data-parallel "
            "replicas of tp x sp ranks each"
        )
    tensor, sequence_data = block_layout(world_size, tp_size)
    model = tp_size * sp_size  # ranks of one data-parallel replica
    sequence = [
        list(range(start + t, start + model, tp_size))
        for start in range(0, world_size, model)
        for t in range(tp_size)
    ]
    data = block_layout(world_size, model)[1]
    return SequenceTensorLayout(tensor, sequence, data, sequence_data)


def _timeout() -> datetime.timedelta:
    from zerostep.parallel.groups import default_timeout_s

    try:
        timeout = dist.group.WORLD._get_backend(_cpu()).options._timeout
        if isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0:
            return timeout
    except (AttributeError, RuntimeError, ValueError):
        pass
    return datetime.timedelta(seconds=default_timeout_s())


def _cpu() -> Any:
    import torch

    return torch.device("cpu")


def _new_groups(member_lists: list[list[int]], rank: int, backend: str | None = None) -> Any:
    """Every rank creates every group (``new_group`` is collective over the world), in one order; returns
    this rank's."""
    mine = None
    timeout = _timeout()
    for members in member_lists:
        group = dist.new_group(members, backend=backend, timeout=timeout)
        if rank in members:
            mine = group
    return mine


def tensor_parallel_mesh(tp_size: int) -> ParallelMesh:
    """The 2-D mesh of ``tp_size``-rank tensor-parallel groups (collective on first use per size; the
    groups are then reused by later engines)."""
    rank, world = _world()
    tp_groups, dp_groups = layout(tp_size, world)
    if tp_size == 1:
        return world_mesh()
    key = (id(dist.group.WORLD), tp_size)
    if key not in _created:
        tp_group = _new_groups(tp_groups, rank)
        dp_group = _new_groups(dp_groups, rank)
        ckpt = _new_groups(dp_groups, rank, backend="gloo")  # checkpoint coordination (zerostep.io)
        _created[key] = (tp_group, dp_group, ckpt)
    tp_group, dp_group, ckpt = _created[key]
    dp_size = world // tp_size
    tp_rank, dp_rank = rank % tp_size, rank // tp_size
    return ParallelMesh(
        dp_group if dp_size > 1 else None,
        dp_rank,
        dp_size,
        tuple(dp_groups[tp_rank]),
        tp_group,
        tp_rank,
        tp_size,
        rank,
        world,
        counts_replicated=tp_rank == 0,
        source="tensor_parallel",
        ckpt_group=ckpt if dp_size > 1 else None,
    )


def _method(mpu: Any, name: str) -> Any:
    """``mpu.<name>``, or its ``get_tensor_model_parallel_*`` twin (Megatron-core's spelling, which
    DeepSpeed's bwc helpers accept too) for a model-parallel method the mpu lacks; None if neither."""
    for candidate in (name, name.replace("get_model_parallel_", "get_tensor_model_parallel_")):
        method = getattr(mpu, candidate, None)
        if callable(method):
            return method
    return None


def check_mpu(mpu: Any) -> None:
    """``mpu`` has Megatron's model-parallel-unit methods (a model-parallel one may be spelled
    ``get_tensor_model_parallel_*``): a ``TypeError`` naming the missing ones."""
    missing = [m for m in MPU_METHODS if _method(mpu, m) is None]
    if missing:
        raise TypeError(
            f"mpu={type(mpu).__name__} lacks the model-parallel-unit method(s) {', '.join(missing)}; "
            f"an mpu (Megatron's, or DeepSpeed's utils.groups) needs all of {', '.join(MPU_METHODS)}"
        )


def _mpu_tp_rank(mpu: Any) -> int:
    """The rank that decides who counts replicated parameters: the tensor-model-parallel rank where the
    mpu has one (DeepSpeed's bwc_tensor_model_parallel_rank), else the model-parallel rank."""
    for name in ("get_tensor_model_parallel_rank", "get_slice_parallel_rank"):
        method = getattr(mpu, name, None)
        if callable(method):
            return int(method())
    return int(_method(mpu, "get_model_parallel_rank")())


def mesh_from_mpu(mpu: Any) -> ParallelMesh:
    """The mesh an ``mpu`` describes, checked against the process groups: its data-parallel group gives
    the engine's reductions and the batch triple's world size, its model-parallel group the gradient
    norm's second reduction and the checkpoint's ``mp_rank``. Collective (a gloo twin of each DP
    group is created for checkpoints): every rank calls it."""
    check_mpu(mpu)
    rank, world = _world()
    dp_size, dp_rank = int(mpu.get_data_parallel_world_size()), int(mpu.get_data_parallel_rank())
    mp_size = int(_method(mpu, "get_model_parallel_world_size")())
    mp_rank = int(_method(mpu, "get_model_parallel_rank")())
    name = type(mpu).__name__
    if not (0 <= dp_rank < dp_size and 0 <= mp_rank < mp_size):
        raise ValueError(
            f"mpu={name}: data-parallel rank {dp_rank} of {dp_size}, model-parallel rank {mp_rank} of "
            f"{mp_size}: a rank must lie in [0, size)"
        )
    if dp_size * mp_size != world:
        raise ValueError(
            f"mpu={name}: data-parallel size {dp_size} x model-parallel size {mp_size} != world size "
            f"{world}; every rank must be one model-parallel rank of one data-parallel replica "
            "(pipeline parallelism through an mpu is not supported)"
        )
    dp_group = mpu.get_data_parallel_group() if dp_size > 1 else None
    mp_group = _method(mpu, "get_model_parallel_group")() if mp_size > 1 else None
    dp_ranks: tuple[int, ...] = (rank,)
    if dp_group is not None:
        if dist.get_world_size(dp_group) != dp_size or dist.get_rank(dp_group) != dp_rank:
            raise ValueError(
                f"mpu={name}: get_data_parallel_group() has {dist.get_world_size(dp_group)} ranks with this "
                f"one at {dist.get_rank(dp_group)}, but get_data_parallel_world_size() / _rank() say "
                f"{dp_size} / {dp_rank}"
            )
        dp_ranks = tuple(dist.get_process_group_ranks(dp_group))
    if mp_group is not None and dist.get_world_size(mp_group) != mp_size:
        raise ValueError(
            f"mpu={name}: get_model_parallel_group() has {dist.get_world_size(mp_group)} ranks, "
            f"get_model_parallel_world_size() says {mp_size}"
        )
    ckpt = None
    if dp_size < world and dp_size > 1:
        # gloo twins of every rank's DP group, created together (each rank names its group's members)
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, dp_ranks)
        lists = sorted({tuple(r) for r in everyone})
        ckpt = _new_groups([list(r) for r in lists], rank, backend="gloo")
    return ParallelMesh(
        dp_group,
        dp_rank,
        dp_size,
        dp_ranks,
        mp_group,
        mp_rank,
        mp_size,
        rank,
        world,
        counts_replicated=_mpu_tp_rank(mpu) == 0,
        source="mpu",
        ckpt_group=ckpt,
    )
