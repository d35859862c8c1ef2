"""Optimizers whose update is not elementwise, over a model-parallel mesh (core/model_parallel.py).

Under tensor parallelism (AutoTP's ``tensor_parallel.autotp_size``, or an ``mpu`` whose model marks
its split parameters) each rank's flat buffers hold its shards of the split parameters and whole copies
of the replicated ones. ``optimizer_options`` gives the optimizer what it needs to update whole
parameters anyway (``zerostep.optim.model_parallel``), with the tensor-parallel group's collectives:

- LAMB and 1-bit LAMB: per flat leaf, which parameter segments are split (``SplitSegments``), so that
  their per-parameter norms (trust ratio, momentum RMS, factor maxima) are summed / maximized over the
  tensor-parallel group, and replicated ones are not counted ``tp`` times;
- Muon: per split matrix, how to gather its shards into the full matrix and cut this rank's shard back
  out (``MatrixSplit``): AutoTP's ``ShardSpec`` (fused qkv parts included), or for an mpu the Megatron
  attribute ``partition_dim`` of the parameter (stride 1);
- 1-bit Adam and 0/1 Adam are elementwise: their compressed exchange runs over the data-parallel group
  (the engine's group), each rank compressing its own shards; the compressed phase's gradient norm is
  completed over the tensor-parallel group by ``core/compressed_phase.py`` (``ReplicaNorm.whole``).

``check_optimizer`` refuses what stays per-shard: torch.optim classes (an arbitrary torch optimizer may
not be elementwise) and mup's (its width multipliers ride on attributes of the original parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zerostep import optim
from zerostep.core.model_parallel import model_parallel_names
from zerostep.optim.model_parallel import MatrixSplit, SplitSegments
from zerostep.optim.registry import MUON_TYPE
from zerostep.parallel import collectives
from zerostep.parallel.flat import FlatLayout
from zerostep.parallel.mesh import ParallelMesh
from zerostep.parallel.tensor_parallel import ShardSpec, full_from_shards, shard_of_full

_SEGMENTED = ("lamb", "onebitlamb")  # per-parameter norms over LAMB's segments


def split_names(model: nn.Module, tp_specs: dict[str, ShardSpec] | None) -> set[str]:
    """Names of the parameters split over the model-parallel group: AutoTP's sharded ones, or those a
    Megatron model marks (``model_parallel`` / ``tensor_model_parallel``)."""
    if tp_specs is not None:
        return {n for n, spec in tp_specs.items() if spec.sharded}
    return model_parallel_names(model)


def check_optimizer(mesh: ParallelMesh, name: str, block_type: str) -> None:
    """The optimizers that cannot see whole parameters under model parallelism: a clear error.
    ``name``: the built optimizer's, ``block_type``: the config's ``optimizer.type``."""
    if mesh.tp_size == 1:
        return
    kind = block_type.lower()
    why = None
    if kind in optim.MUP_OPTIMIZER_TYPES:
        why = (
            "mup's width multipliers are read from the parameters' infshape, which a tensor-parallel "
            "shard does not carry"
        )
    elif kind in optim.PER_PARAMETER_TYPES and kind != MUON_TYPE:
        why = (
            "a torch.optim class runs per parameter and would treat each model-parallel shard as a "
            "whole tensor (not every torch optimizer is elementwise)"
        )
    if why:
        raise ValueError(
            f"optimizer {block_type!r} with model parallelism ({mesh.describe()}): not supported, {why}; "
            "use Adam, AdamW, SGD, Lion, Adagrad, LAMB, Muon or a 1-bit optimizer"
        )


def optimizer_options(
    mesh: ParallelMesh,
    block_type: str,
    layouts: dict[str, FlatLayout],
    tp_specs: dict[str, ShardSpec] | None,
    model: nn.Module,
) -> dict[str, Any]:
    """``optim.from_config`` keyword arguments for ``block_type`` over ``mesh`` (none without model
    parallelism, or for an elementwise optimizer)."""
    if mesh.tp_size == 1:
        return {}
    kind = block_type.lower()
    split = split_names(model, tp_specs)
    if kind in _SEGMENTED:
        return {"model_parallel": split_segments(mesh, layouts, split)}
    if kind == MUON_TYPE:
        return {"split_matrices": split_matrices(mesh, layouts, split, tp_specs, model)}
    return {}


def split_segments(
    mesh: ParallelMesh, layouts: dict[str, FlatLayout], split: set[str]
) -> dict[str, SplitSegments]:
    """Per unit: the layout's entries (LAMB's trust segments, 1-bit LAMB's tensors, in layout order)
    flagged split or not, with sum and all-gather over the tensor-parallel group."""
    group = mesh.tp_group
    reduce = _all_reduce(group)
    gather = _all_gather(group)
    return {
        g: SplitSegments(tuple(e.name in split for e in lay.entries), mesh.tp_size, reduce, gather)
        for g, lay in layouts.items()
    }


def split_matrices(
    mesh: ParallelMesh,
    layouts: dict[str, FlatLayout],
    split: set[str],
    tp_specs: dict[str, ShardSpec] | None,
    model: nn.Module,
) -> dict[str, MatrixSplit]:
    """Name -> ``MatrixSplit`` of every split parameter Muon orthogonalizes."""
    from zerostep.optim.muon import uses_muon

    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for lay in layouts.values():
        for e in lay.entries:
            shape = tuple(e.shape)
            if e.name not in split or not uses_muon(e.name, shape):
                continue
            spec = tp_specs[e.name] if tp_specs is not None else _mpu_spec(e.name, params[e.name], mesh)
            full = list(shape)
            full[spec.dim] *= spec.tp_size
            out[e.name] = _matrix_split(mesh, spec, shape, tuple(full))
    return out


def _mpu_spec(name: str, param: torch.Tensor, mesh: ParallelMesh) -> ShardSpec:
    """A Megatron parameter's split, from its ``partition_dim`` / ``partition_stride`` attributes."""
    dim, stride = getattr(param, "partition_dim", None), getattr(param, "partition_stride", 1)
    if not isinstance(dim, int) or stride != 1:
        raise ValueError(
            f"optimizer Muon with mpu=: parameter {name!r} is marked model-parallel but its "
            f"partition_dim={dim!r}, partition_stride={stride!r} do not say how to reassemble the whole "
            "matrix (Newton-Schulz needs it); set partition_dim (and stride 1) as Megatron's layers do"
        )
    if not 0 <= dim < param.dim():
        raise ValueError(f"parameter {name!r}: partition_dim={dim} outside its {param.dim()} dimensions")
    return ShardSpec(dim, mesh.tp_size)


def _matrix_split(
    mesh: ParallelMesh, spec: ShardSpec, local_shape: tuple[int, ...], full_shape: tuple[int, ...]
) -> MatrixSplit:
    group, tp, rank = mesh.tp_group, mesh.tp_size, mesh.tp_rank

    def gather(local: torch.Tensor) -> torch.Tensor:
        flat = collectives.all_gather_flat(local.contiguous().reshape(-1), group)  # [tp * numel]
        return full_from_shards(list(flat.view(tp, *local_shape).unbind(0)), spec)  # [*full_shape]

    def shard(full: torch.Tensor) -> torch.Tensor:
        return shard_of_full(full, spec, rank)

    return MatrixSplit(full_shape, gather, shard)


def _all_reduce(group: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: collectives.all_reduce_flat(t, group)


def _all_gather(group: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: collectives.all_gather_flat(t, group)
