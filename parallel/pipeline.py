"""Pipeline parallelism's layout: how layers split into stages and how ranks form the 2-D mesh.

- ``partition_uniform`` / ``partition_balanced`` / ``partition_by_type``: DeepSpeed's partition methods
  (``PipelineModule(partition_method=...)``): ``uniform`` gives each stage the same number of layers,
  ``parameters`` balances trainable parameter counts, ``type:<regex>`` balances the layers whose class
  name matches. They return DeepSpeed's ``parts``: stage ``s`` owns layers ``parts[s]:parts[s+1]``.
  ``partition_balanced`` follows DeepSpeed's dynamic program, including its tie-breaking (the last
  split point among equal costs), so the same layers land on the same stages as under DeepSpeed.
- ``ProcessTopology`` / ``PipeDataParallelTopology``: DeepSpeed's row-major rank grid. With axes
  ``("pipe", "data")`` stage ``s`` holds global ranks ``s*dp ... s*dp + dp - 1``.
- ``PipeMesh``: this rank's place in the pipeline x data-parallel grid and the groups over it: its
  data-parallel group (the ranks holding the same stage: ZeRO's gradients are reduced there), its pipe
  group (one rank per stage, same data-parallel coordinate: activations flow there) and the tie groups
  (the stages that hold a copy of a tied layer).
"""

from __future__ import annotations

import datetime
import re
from collections import namedtuple
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product

import torch
import torch.distributed as dist

PIPE_AXIS, DATA_AXIS = "pipe", "data"


# ----------------------------------------------------------------------------------------------
# partitioning


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """``num_parts + 1`` boundaries giving each part ``num_items // num_parts`` items, the first
    ``num_items % num_parts`` parts one more (DeepSpeed's ``partition_uniform``)."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    size, extra = divmod(num_items, num_parts)
    bounds = [0]
    for p in range(num_parts):
        bounds.append(bounds[-1] + size + (1 if p < extra else 0))
    return bounds


def partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """Boundaries splitting ``weights`` into ``num_parts`` contiguous parts whose sums differ least.

    DeepSpeed's linear-partition dynamic program: state ``(i, j)`` (the first ``i`` items in ``j``
    parts) keeps the split whose ``max - min`` part sum is lowest, preferring the last split point on a
    tie, and the answer is traced back from ``(n, num_parts)``. Fewer items than parts: uniform."""
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = float("inf")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    # best[i][j] = (cost, max part sum, min part sum, split point) of the chosen split
    best: list[list[tuple[float, float, float, int]]] = [[(inf, inf, inf, 0)] * (m + 1) for _ in range(n + 1)]
    best[0][0] = (0.0, 0.0, inf, 0)
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            chosen = best[i][j]
            for k in range(i):
                part = prefix[i] - prefix[k]
                _, hi, lo, _ = best[k][j - 1]
                top, bottom = max(hi, part), min(lo, part)
                cost = top - bottom
                if chosen[0] >= cost:
                    chosen = (cost, top, bottom, k)
            best[i][j] = chosen
    bounds = [n]
    for j in range(m, 0, -1):
        bounds.append(best[bounds[-1]][j][3])
    return bounds[::-1]


def partition_by_type(type_names: Sequence[str | None], pattern: str, num_parts: int) -> list[int]:
    """``type:<regex>``: balance the layers whose type name matches ``pattern`` (case-insensitive
    search), each weighing 1 and every other layer 0. No match is an error, as in DeepSpeed."""
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(
            f"partition_method 'type:{pattern}': {pattern!r} is not a regular expression ({e})"
        ) from e
    weights = [1 if name is not None and regex.search(name) else 0 for name in type_names]
    if not any(weights):
        names = sorted({n for n in type_names if n is not None})
        raise ValueError(
            f"partition_method 'type:{pattern}' matches no layer (layer types: {', '.join(names) or 'none'})"
        )
    return partition_balanced(weights, num_parts)


def partition(
    method: str, param_counts: Sequence[int], type_names: Sequence[str | None], num_parts: int
) -> list[int]:
    """The boundaries ``PipelineModule(partition_method=method)`` gives, for layers with these trainable
    parameter counts and type names."""
    if not isinstance(method, str):
        raise ValueError(f"partition_method must be a string, got {type(method).__name__}")
    lowered = method.lower()
    if lowered == "uniform":
        return partition_uniform(len(param_counts), num_parts)
    if lowered == "parameters":
        return partition_balanced(param_counts, num_parts)
    if lowered.startswith("type:"):
        return partition_by_type(type_names, method.split(":", 1)[1], num_parts)
    if lowered == "profile":
        raise NotImplementedError("partition_method 'profile' is not implemented (nor is it in DeepSpeed)")
    raise ValueError(f"partition_method {method!r} is unknown; use 'parameters', 'uniform' or 'type:<regex>'")


def virtual_stage_indices(rank: int, num_ranks: int, per_rank: int, style: str) -> list[int]:
    """The pipeline stages rank ``rank`` of ``num_ranks`` runs when each runs ``per_rank`` of them:
    ``"loop"`` (interleaved schedules) ``rank, rank + p, rank + 2p, ...``; ``"v"`` (ZBV, DualPipeV:
    two per rank) ``rank`` and ``2p - 1 - rank``."""
    if per_rank == 1:
        return [rank]
    if style == "v":
        if per_rank != 2:
            raise ValueError(f"V-shaped schedules run exactly 2 stages per rank, not {per_rank}")
        return [rank, 2 * num_ranks - 1 - rank]
    return [rank + v * num_ranks for v in range(per_rank)]


# ----------------------------------------------------------------------------------------------
# topology


class ProcessTopology:
    """DeepSpeed's rank grid: ``axes`` named, ``dims`` long, row-major (the last axis varies fastest)."""

    def __init__(self, axes: Sequence[str], dims: Sequence[int]) -> None:
        if len(axes) != len(dims) or not axes:
            raise ValueError(f"ProcessTopology needs one dimension per axis, got axes={axes} dims={dims}")
        if any(int(d) < 1 for d in dims):
            raise ValueError(f"ProcessTopology dims must be >= 1, got {list(dims)}")
        self.axes = list(axes)
        self.dims = [int(d) for d in dims]
        self.ProcessCoord = namedtuple("ProcessCoord", self.axes)
        coords = product(*[range(d) for d in self.dims])
        self.mapping = {self.ProcessCoord(*c): r for r, c in enumerate(coords)}
        self._coords = {r: c for c, r in self.mapping.items()}

    def get_rank(self, **coords: int) -> int:
        if set(coords) != set(self.axes):
            raise ValueError(f"get_rank needs every axis {self.axes}, got {sorted(coords)}")
        return self.mapping[self.ProcessCoord(**coords)]

    def get_coord(self, rank: int) -> tuple:
        if rank not in self._coords:
            raise ValueError(f"rank {rank} is outside this topology of {self.world_size()} ranks")
        return self._coords[rank]

    def get_dim(self, axis: str) -> int:
        return self.dims[self.axes.index(axis)] if axis in self.axes else 1

    def get_axis_names(self) -> list[str]:
        return list(self.axes)

    def world_size(self) -> int:
        size = 1
        for d in self.dims:
            size *= d
        return size

    def get_axis_comm_lists(self, axis: str) -> list[list[int]]:
        """The rank lists that differ only along ``axis`` (one communicator each), in order."""
        if axis not in self.axes:
            return []
        others = [a for a in self.axes if a != axis]
        lists = []
        for fixed in product(*[range(self.get_dim(a)) for a in others]):
            coords = dict(zip(others, fixed))
            lists.append([self.get_rank(**coords, **{axis: i}) for i in range(self.get_dim(axis))])
        return lists

    def filter_match(self, **coords: int) -> list[int]:
        return [
            r
            for c, r in sorted(self.mapping.items(), key=lambda x: x[1])
            if all(getattr(c, a) == v for a, v in coords.items())
        ]

    def __str__(self) -> str:
        return f"ProcessTopology(axes={self.axes}, dims={self.dims})"


class PipeDataParallelTopology(ProcessTopology):
    """Pipeline x data parallelism: axes ``("pipe", "data")``."""

    def __init__(self, num_pp: int, num_dp: int) -> None:
        super().__init__([PIPE_AXIS, DATA_AXIS], [num_pp, num_dp])


def check_topology(topology: ProcessTopology, world_size: int) -> None:
    """Only pipe and data axes of more than one rank are implemented, and the grid must fill the world."""
    extra = [
        a for a in topology.get_axis_names() if a not in (PIPE_AXIS, DATA_AXIS) and topology.get_dim(a) > 1
    ]
    if extra:
        raise NotImplementedError(
            f"topology axes {extra} (model/tensor parallelism) are not implemented; zerostep pipelines "
            "over 'pipe' x 'data' only"
        )
    if topology.world_size() != world_size:
        raise ValueError(
            f"the topology {topology} covers {topology.world_size()} ranks but the world has {world_size}"
        )


def default_topology(num_stages: int, world_size: int) -> PipeDataParallelTopology:
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if world_size % num_stages:
        raise ValueError(
            f"num_stages ({num_stages}) must divide the world size ({world_size}): every stage needs the "
            "same number of data-parallel ranks"
        )
    return PipeDataParallelTopology(num_stages, world_size // num_stages)


# ----------------------------------------------------------------------------------------------
# the mesh


@dataclass
class PipeMesh:
    """This rank's coordinates in the pipe x data grid and the process groups over it."""

    topology: ProcessTopology
    rank: int  # global
    stage_id: int
    num_stages: int
    dp_rank: int
    dp_size: int
    pipe_ranks: list[int]  # global rank of each stage along this rank's pipe line
    dp_ranks: list[int]  # global ranks of this stage's data-parallel group
    pipe_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    tie_groups: dict[str, tuple[list[int], dist.ProcessGroup | None]] = field(default_factory=dict)

    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def add_tie_groups(self, stages_by_key: dict[str, list[int]]) -> None:
        """Create, collectively on every rank, one group per tied key and data-parallel coordinate over
        the stages holding a copy of the key's module; keep this rank's. Keys are visited sorted, so
        every rank creates the groups in the same order."""
        for key in sorted(stages_by_key):
            stages = sorted(set(stages_by_key[key]))
            if len(stages) < 2:
                continue
            for d in range(self.dp_size):
                ranks = [self.topology.get_rank(**{PIPE_AXIS: s, DATA_AXIS: d}) for s in stages]
                group = _new_group(ranks)
                if self.rank in ranks:
                    self.tie_groups[key] = (ranks, group)


def _new_group(ranks: list[int]) -> dist.ProcessGroup | None:
    """A group over ``ranks`` with the default group's timeout (``new_group`` would otherwise give it
    torch's 30 minutes, so a dead peer in a pipeline receive would stall its neighbours that long)."""
    if not dist.is_initialized():
        return None
    return dist.new_group(ranks=ranks, timeout=_default_timeout())


def _default_timeout() -> datetime.timedelta | None:
    try:
        timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return None
    return timeout if isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0 else None


def build_mesh(topology: ProcessTopology) -> PipeMesh:
    """Every rank calls it (it creates the groups collectively): this rank's ``PipeMesh``."""
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    rank = dist.get_rank() if initialized else 0
    check_topology(topology, world)
    num_stages, dp_size = topology.get_dim(PIPE_AXIS), topology.get_dim(DATA_AXIS)
    coord = topology.get_coord(rank)
    stage_id = getattr(coord, PIPE_AXIS, 0)
    dp_rank = getattr(coord, DATA_AXIS, 0)
    pipe_group = dp_group = None
    pipe_ranks = [topology.get_rank(**{PIPE_AXIS: s, DATA_AXIS: dp_rank}) for s in range(num_stages)]
    dp_ranks = [topology.get_rank(**{PIPE_AXIS: stage_id, DATA_AXIS: d}) for d in range(dp_size)]
    if initialized:
        # new_group is collective over the world: every rank creates every group, in the same order
        for ranks in topology.get_axis_comm_lists(PIPE_AXIS):
            group = _new_group(ranks)
            if rank in ranks:
                pipe_group = group
        for ranks in topology.get_axis_comm_lists(DATA_AXIS):
            group = _new_group(ranks)
            if rank in ranks:
                dp_group = group
    return PipeMesh(
        topology=topology,
        rank=rank,
        stage_id=stage_id,
        num_stages=num_stages,
        dp_rank=dp_rank,
        dp_size=dp_size,
        pipe_ranks=pipe_ranks,
        dp_ranks=dp_ranks,
        pipe_group=pipe_group if num_stages > 1 else None,
        dp_group=dp_group if dp_size > 1 else None,
    )


def all_reduce_over_pipe(values: torch.Tensor, mesh: PipeMesh) -> torch.Tensor:
    """Sum ``values`` over the stages of this rank's pipe line (in place; returned)."""
    if mesh.pipe_group is not None:
        dist.all_reduce(values, group=mesh.pipe_group)
    return values
