"""The engine over a data-parallel x model-parallel mesh: which mesh, and the global gradient norm.

``mesh_for(config, mpu, mesh)`` picks the mesh an engine runs over (``parallel/mesh.py``): the one
passed, an ``mpu``'s, the config's ``tensor_parallel.autotp_size``, or the world. The engine then takes
its data-parallel group, rank and size from the mesh: reductions, ZeRO sharding, the agreement of the
plan, shared memory, the loss average and the batch triple all run over data parallelism only.

With model parallelism the gradient norm (and the finite check in it) is a sum over the model-parallel
group as well: ``ReplicaNorm`` adds the squares of the parameters this rank counts — its shards of
model-parallel parameters, and the replicated ones only on model-parallel rank 0 (DeepSpeed's
``is_model_parallel_parameter`` rule) — and all-reduces the sum over the MP group after the DP
all-reduce. Uncounted elements enter as ``0 * sum``, so a non-finite value anywhere still skips the
step on every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from zerostep.parallel import collectives
from zerostep.parallel.flat import FlatLayout
from zerostep.parallel.mesh import ParallelMesh, mesh_from_mpu, tensor_parallel_mesh, world_mesh

Ranges = tuple[tuple[int, int], ...]


def mesh_for(config: Any, mpu: Any = None, mesh: ParallelMesh | None = None) -> ParallelMesh:
    """The mesh an engine trains over (collective when it creates groups: every rank calls it)."""
    tp = int(getattr(getattr(config, "tensor_parallel", None), "autotp_size", 0) or 0)
    given = [what for what, v in (("mesh", mesh), ("mpu", mpu)) if v is not None]
    if len(given) == 2:
        raise ValueError("pass either mesh= or mpu=, not both")
    if given and tp > 1:
        raise ValueError(
            f"tensor_parallel.autotp_size = {tp} builds its own mesh; it cannot be combined with an "
            "mpu= or mesh= (give the groups one way)"
        )
    if mesh is not None:
        return mesh
    if mpu is not None:
        return mesh_from_mpu(mpu)
    if tp > 1:
        return tensor_parallel_mesh(tp)
    return world_mesh()


def agreement_group(mesh: ParallelMesh) -> Any:
    """The ranks that must build identical engines: every rank under AutoTP (one model, equal shards,
    one config), else the data-parallel group (an mpu's model-parallel ranks hold different parts)."""
    import torch.distributed as dist

    if mesh.source == "tensor_parallel" and mesh.world_size > 1:
        return dist.group.WORLD
    return mesh.dp_group


def model_parallel_names(model: nn.Module) -> set[str]:
    """Parameters a Megatron model marks as split over the model-parallel group (``model_parallel`` or
    ``tensor_model_parallel`` true, as DeepSpeed's ``is_model_parallel_parameter`` reads them)."""
    return {
        n
        for n, p in model.named_parameters()
        if getattr(p, "model_parallel", False) or getattr(p, "tensor_model_parallel", False)
    }


def _merge(ranges: Iterable[tuple[int, int]]) -> Ranges:
    out: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[0] < r[1]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


@dataclasses.dataclass(frozen=True)
class ReplicaNorm:
    """Per group: element ranges of this rank's gradient part that count toward the global norm, the
    ranges that do not, and per-entry flags for a list of per-parameter gradients. ``group``: the
    model-parallel group the sum is completed over. Static data (hashable) for the compiled graph A."""

    group: Any
    world_rank: int
    counted: dict[str, Ranges]
    uncounted: dict[str, Ranges]
    entry_counted: dict[str, tuple[bool, ...]]
    # the same over whole (unsharded) buffers: a rank's local gradients in 1-bit optimizers' compressed
    # phase (core/compressed_phase.py); None when this one already is
    whole: ReplicaNorm | None = None

    def __hash__(self) -> int:
        return id(self)

    def sumsq(self, g: str, grad: Any) -> torch.Tensor:
        """Counted sum of squares of group ``g``'s gradient part (flat, or a list in layout order)."""
        if isinstance(grad, list):
            total = grad[0].new_zeros((), dtype=torch.float32)
            for flag, part in zip(self.entry_counted[g], grad):
                s = part.float().pow(2).sum()
                total = total + (s if flag else 0.0 * s)
            return total
        total = grad.new_zeros((), dtype=torch.float32)
        for a, b in self.counted[g]:
            total = total + grad[a:b].float().pow(2).sum()
        for a, b in self.uncounted[g]:
            total = total + 0.0 * grad[a:b].float().pow(2).sum()
        return total

    def complete(self, packed: torch.Tensor) -> torch.Tensor:
        """``[sumsq, loss, *failures]`` reduced over DP -> the same with sumsq and the failures summed
        over the model-parallel group too (the loss is the same on every MP rank: kept)."""
        summed = collectives.all_reduce_flat(packed, self.group, None)
        return torch.cat([summed[:1], packed[1:2], summed[2:]])


def replica_norm(
    mesh: ParallelMesh,
    layouts: dict[str, FlatLayout],
    sharded: set[str],
    *,
    stage: int,
    rank: int,
    world_size: int,
) -> ReplicaNorm | None:
    """The norm's share for this rank, or None without model parallelism. ``sharded``: names of the
    model-parallel (split) parameters; the rest are replicated over the MP group. ``rank`` /
    ``world_size``: data-parallel, deciding which part of each flat gradient this rank sums."""
    if mesh.tp_size == 1:
        return None
    whole = None
    if world_size > 1:
        whole = replica_norm(mesh, layouts, sharded, stage=stage, rank=0, world_size=1)
    counted, uncounted, flags = {}, {}, {}
    for g, lay in layouts.items():
        lo, hi = (0, lay.padded_numel) if world_size == 1 else lay.shard_range(rank)
        yes, no = [], []
        for e in lay.entries:
            a, b = max(lo, e.offset), min(hi, e.end)
            if a < b:
                counts = mesh.counts_replicated or e.name in sharded
                (yes if counts else no).append((a - lo, b - lo))
        counted[g], uncounted[g] = _merge(yes), _merge(no)
        flags[g] = tuple(mesh.counts_replicated or e.name in sharded for e in lay.entries)
    return ReplicaNorm(mesh.tp_group, mesh.world_rank, counted, uncounted, flags, whole)


def shard_model(model: nn.Module, config: Any, mesh: ParallelMesh) -> dict[str, Any] | None:
    """``tensor_parallel.autotp_size`` N > 1: shard ``model`` in place over the mesh's tensor-parallel
    group with its architecture's AutoTP plan (``core/autotp.py``, ``parallel/tensor_parallel.py``),
    before the engine flattens it; returns name -> ``ShardSpec`` (None without tensor parallelism).
    Every rank must hold the same full weights on entry (build the model from one seed)."""
    tp = config.tensor_parallel.size
    if tp == 1:
        return None
    if mesh.source != "tensor_parallel" or mesh.tp_size != tp:
        raise ValueError(
            f"tensor_parallel.autotp_size = {tp} needs the engine's mesh to be its tensor-parallel mesh "
            f"(parallel.mesh.tensor_parallel_mesh({tp})), got {mesh.describe()}"
        )
    from zerostep.core.autotp import tp_plan
    from zerostep.parallel.tensor_parallel import shard_module

    return shard_module(model, tp_plan(model, tp), mesh.tp_group)


def norm_share(
    mesh: ParallelMesh,
    model: nn.Module,
    layouts: dict[str, FlatLayout],
    tp_specs: dict[str, Any] | None,
    stage: int,
) -> ReplicaNorm | None:
    """The gradient norm's model-parallel share (see ``replica_norm``): split parameters are the
    AutoTP plan's sharded ones, or those a Megatron model marks (``model_parallel_names``)."""
    if mesh.tp_size == 1:
        return None
    if tp_specs is not None:
        sharded = {n for n, spec in tp_specs.items() if spec.sharded}
    else:
        sharded = model_parallel_names(model)
    return replica_norm(mesh, layouts, sharded, stage=stage, rank=mesh.dp_rank, world_size=mesh.dp_size)


def full_tensors(
    mesh: ParallelMesh, specs: dict[str, Any], local: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Name -> full (TP-agnostic) tensor from this rank's shards: split parameters all-gathered over the
    tensor-parallel group and reassembled (``full_from_shards``), replicated ones as they are.
    Collective over the TP group, in ``local``'s order (every TP rank holds the same names)."""
    import torch.distributed as dist

    from zerostep.parallel.tensor_parallel import full_from_shards

    out = {}
    for name, t in local.items():
        spec = specs[name]
        if not spec.sharded:
            out[name] = t
            continue
        t = t.contiguous()
        shards = [torch.empty_like(t) for _ in range(mesh.tp_size)]
        dist.all_gather(shards, t, group=mesh.tp_group)
        out[name] = full_from_shards(shards, spec)
    return out


def local_tensors(
    mesh: ParallelMesh, specs: dict[str, Any], full: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Name -> this rank's shard of each full tensor (``shard_of_full``): no communication."""
    from zerostep.parallel.tensor_parallel import shard_of_full

    return {n: shard_of_full(t, specs[n], mesh.tp_rank) for n, t in full.items()}


def full_layout(layout: FlatLayout, full_shapes: dict[str, tuple[int, ...]]) -> FlatLayout:
    """``layout`` with each entry at its full (TP=1) shape: the layout a one-TP-rank engine of the same
    model builds (units and entry order do not depend on shapes, so the groups match)."""
    entries = [(e.name, full_shapes.get(e.name, e.shape)) for e in layout.entries]
    return FlatLayout.build(entries, layout.dtype, layout.world_size, align=layout.align)


def full_shapes(specs: dict[str, Any], layouts: dict[str, FlatLayout]) -> dict[str, tuple[int, ...]]:
    """Name -> full shape of every entry of ``layouts`` (a split dim times the TP size)."""
    out = {}
    for lay in layouts.values():
        for e in lay.entries:
            spec = specs[e.name]
            shape = list(e.shape)
            if spec.sharded:
                shape[spec.dim] *= spec.tp_size
            out[e.name] = tuple(shape)
    return out


def check_same_batch(mesh: ParallelMesh, batch: Any, device: torch.device) -> None:
    """Tensor parallelism: every rank of a tensor-parallel group must get the same batch (its ranks
    compute one replica's forward together; DeepSpeed checks this on the first forward too). Compares a
    signature of the batch's tensors (count, sum, position-weighted sum, in float64) over the TP group;
    a ``ValueError`` on every rank of the group when they differ. Collective over the TP group."""
    import optree
    import torch.distributed as dist

    leaves = [t for t in optree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
    parts = []
    for t in leaves:
        flat = t.detach().reshape(-1).to(device=device, dtype=torch.float64)
        weights = torch.arange(1, flat.numel() + 1, device=device, dtype=torch.float64)
        parts.append(torch.stack([flat.new_tensor(float(flat.numel())), flat.sum(), (flat * weights).sum()]))
    sig = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(mesh.tp_size)]
    dist.all_gather(sizes, torch.tensor([sig.numel()], device=device), group=mesh.tp_group)
    same = len({int(s.item()) for s in sizes}) == 1
    if same:
        sigs = [torch.empty_like(sig) for _ in range(mesh.tp_size)]
        dist.all_gather(sigs, sig, group=mesh.tp_group)
        same = all(torch.equal(s, sigs[0]) for s in sigs)
    if not same:
        raise ValueError(
            f"tensor parallelism: the ranks of a tensor-parallel group got different batches "
            f"({mesh.describe()}); they compute one model replica together, so give each data-parallel "
            "replica's ranks the same samples (shard the data by the data-parallel rank, engine.rank)"
        )
