"""MoE experts as ZeRO units of their own, over their expert-data-parallel group.

Each ``zerostep.moe.layer.MoE`` layer's ``Experts`` module (``<layer>.deepspeed_moe.experts``) becomes
one unit, named by that module path, holding only this rank's ``num_experts / ep_size`` experts (local
names ``...deepspeed_experts.<i>...``). The step treats it as any unit except for its group
(``StepPlan.unit_groups``): its gradient is summed over the expert-data-parallel group (the ranks that
hold the same experts) instead of the data-parallel group, and ZeRO 1-3 shard it over that group (its
layout is padded for the group's size). The sum is divided by the data-parallel size as every gradient
is (``StepPlan.unscale``), which is DeepSpeed's expert gradient: the mean over the data-parallel ranks of
each rank's contribution, zero from the ranks that do not hold the expert.

The global norm needs no change: every expert's gradient is held once per expert-data-parallel rank
(replicated at stage 0, where each of them counts its own slice of the buffer; sharded from stage 1 on),
and experts differ across the expert-parallel group, so one all-reduce over the data-parallel world of
each rank's partial sum counts every expert element exactly once.

With ``ep_size = 1`` every rank holds every expert, the expert-data-parallel group is the data-parallel
one, and the unit simply uses the engine's group.

Checkpoints and ``full_params`` speak global names (``parallel.expert.global_expert_name``): the unit as
one process holding every expert would have it (``global_layouts``). A save gathers each expert unit's
buffers over the expert groups into that layout (``checkpoint_view``: transiently a whole expert unit per
buffer on every rank, as the tensor-parallel save does), so the checkpoint is the one-process one; a load
reads only this rank's local experts, entry by entry (core/checkpointing.py's moved entries), at any world
size and ``ep_size`` that divides ``num_experts``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optree
import torch
from torch import nn

from zerostep import optim
from zerostep.parallel.collectives import all_gather_flat
from zerostep.parallel.expert import expert_index, global_expert_name, local_expert_name
from zerostep.parallel.flat import FlatLayout


@dataclass(frozen=True)
class UnitGroup:
    """The group a unit is reduced and sharded over, when it is not the engine's data-parallel group."""

    group: Any  # a torch.distributed ProcessGroup (never None: units with a group of their own need one)
    size: int
    rank: int  # this rank's index in ``group``


@dataclass(frozen=True)
class ExpertUnit:
    """One MoE layer's experts on this rank."""

    name: str  # the unit's name: the module path of the layer's Experts
    num_experts: int
    num_local: int
    first_local: int  # global index of local expert 0
    ep_size: int
    ep_group: Any  # the expert-parallel group (None in one process)
    edp: UnitGroup  # the expert-data-parallel group (a 1-rank group where ep_size is the world size)

    def global_name(self, name: str) -> str:
        return global_expert_name(name, self.first_local)

    def local_name(self, name: str) -> str | None:
        """This rank's name of global parameter ``name``, or None where another rank holds the expert."""
        return local_expert_name(name, self.first_local, self.num_local)


class ExpertUnits(Mapping):
    """Unit name -> ``ExpertUnit`` for every MoE layer of a model (empty for a dense model)."""

    def __init__(self, units: dict[str, ExpertUnit], world_size: int, rank: int) -> None:
        self._units = units
        self.world_size, self.rank = world_size, rank

    def __getitem__(self, name: str) -> ExpertUnit:
        return self._units[name]

    def __iter__(self):
        return iter(self._units)

    def __len__(self) -> int:
        return len(self._units)

    @property
    def parallel(self) -> bool:
        """Some layer splits its experts over several ranks (``ep_size > 1``)."""
        return any(u.ep_size > 1 for u in self._units.values())

    def unit_groups(self) -> dict[str, UnitGroup]:
        """``StepPlan.unit_groups``: the expert units whose group is not the data-parallel one."""
        return {n: u.edp for n, u in self._units.items() if u.ep_size > 1}

    # ------------------------------------------------------------------ layouts

    def split_layouts(self, layouts: dict[str, FlatLayout], dtype: torch.dtype) -> dict[str, FlatLayout]:
        """The engine's unit layouts with every MoE layer's expert parameters moved out of the unit that
        held them into a unit of their own (right after it, so every rank orders collectives alike),
        padded for the expert-data-parallel size."""
        out: dict[str, FlatLayout] = {}
        for g, lay in layouts.items():
            taken: dict[str, list[tuple[str, tuple[int, ...]]]] = {u: [] for u in self._units}
            rest = []
            for e in lay.entries:
                owner = next((u for u in self._units if e.name.startswith(u + ".")), None)
                (taken[owner] if owner is not None else rest).append((e.name, e.shape))
            if rest:
                whole = len(rest) == len(lay.entries)
                out[g] = lay if whole else FlatLayout.build(rest, dtype, lay.world_size)
            for u, entries in taken.items():
                if entries:
                    out[u] = FlatLayout.build(entries, dtype, self._units[u].edp.size)
        return out

    def global_layouts(self, layouts: Mapping[str, FlatLayout]) -> dict[str, FlatLayout]:
        """``layouts`` with each expert unit holding all ``num_experts`` experts under their global
        names, in global order, padded for the data-parallel world: the layout of one process holding
        every expert (what checkpoints are written in)."""
        out = {}
        for g, lay in layouts.items():
            unit = self._units.get(g)
            if unit is None:
                out[g] = lay
                continue
            entries = [
                (global_expert_name(e.name, p * unit.num_local), e.shape)
                for p in range(unit.ep_size)
                for e in lay.entries
            ]
            out[g] = FlatLayout.build(entries, lay.dtype, self.world_size, lay.align)
        return out

    def local_values(
        self, layouts: Mapping[str, FlatLayout], by_global_name: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Tensors by this rank's parameter names, from tensors by global name (a checkpoint's): each
        expert unit takes its local experts, the other units their own names."""
        out = {}
        for g, lay in layouts.items():
            unit = self._units.get(g)
            for name in lay.names:
                out[name] = by_global_name[name if unit is None else unit.global_name(name)]
        return out

    # ------------------------------------------------------------------ gathering

    def global_tensors(self, g: str, local: torch.Tensor, layout: FlatLayout) -> dict[str, torch.Tensor]:
        """Global name -> tensor of every expert of unit ``g``, from this rank's whole local buffer
        ``local`` [padded_numel] (a collective over the expert-parallel group; views of a new buffer)."""
        unit = self._units[g]
        every = local if unit.ep_size == 1 else all_gather_flat(local.contiguous(), unit.ep_group)
        rows = every.view(unit.ep_size, -1)  # [P, padded_numel]: ep rank p's local experts
        out = {}
        for p in range(unit.ep_size):
            for name, view in layout.unflatten(rows[p]).items():
                out[global_expert_name(name, p * unit.num_local)] = view
        return out

    def check_saved(self, saved_layouts: Mapping[str, Any], where: str) -> str | None:
        """A message when a checkpoint's expert unit holds another number of experts than this model's
        (``saved_layouts``: the manifest's group -> {"entries": [[name, shape, offset], ...]})."""
        for g, unit in self._units.items():
            saved = saved_layouts.get(g)
            if saved is None:
                continue
            indices = {parts[1] for n, _, _ in saved["entries"] if (parts := expert_index(n)) is not None}
            if len(indices) != unit.num_experts:
                return (
                    f"{where}: the checkpoint's MoE layer {g!r} has {len(indices)} experts, this model's has "
                    f"{unit.num_experts}; a checkpoint loads at any world size and ep_size, not with another "
                    "num_experts"
                )
        return None


def find_expert_units(model: nn.Module, world_size: int, rank: int, dp_is_world: bool) -> ExpertUnits:
    """Every MoE layer of ``model`` as an ``ExpertUnit`` (its expert groups created where they are not
    yet: collectively, in module order, on every rank)."""
    from zerostep.parallel.moe_layer import MoE

    units = {}
    for path, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        if module.ep_size > 1 and not dp_is_world:
            raise ValueError(
                f"MoE layer {path!r} has ep_size={module.ep_size}: expert parallelism with tensor or "
                "model parallelism (an mpu, a mesh, tensor_parallel.autotp_size) is not supported"
            )
        if module.groups is None:
            module.set_deepspeed_parallelism()
        groups = module.groups
        name = f"{path}.deepspeed_moe.experts" if path else "deepspeed_moe.experts"
        edp_size = len(groups.edp_ranks)
        edp = UnitGroup(groups.edp_group, edp_size, groups.edp_ranks.index(rank))
        units[name] = ExpertUnit(
            name=name,
            num_experts=module.num_experts,
            num_local=module.num_local_experts,
            first_local=module.first_expert,
            ep_size=module.ep_size,
            ep_group=groups.ep_group,
            edp=edp,
        )
    return ExpertUnits(units, world_size, rank)


def check_supported(units: ExpertUnits, config: Any, optimizer_type: str | None, offload: bool) -> None:
    """Expert parallelism (``ep_size > 1``) with what does not yet know a unit's own group: a clear error."""
    if not units.parallel:
        return
    optimizer_type = (optimizer_type or "").lower()
    per_unit_comm = optimizer_type == "lamb" or optimizer_type in optim.PER_PARAMETER_TYPES
    if per_unit_comm or optimizer_type in optim.COMPRESSED_OPTIMIZER_TYPES:
        raise ValueError(
            f"MoE with ep_size > 1 and the {optimizer_type} optimizer is not supported (its update "
            "communicates per unit over the data-parallel group); use Adam/AdamW, SGD, Lion or Adagrad"
        )
    if offload:
        raise ValueError("MoE with ep_size > 1 and zero_optimization.offload_optimizer is not supported")
    if config.sparse_gradients:
        raise ValueError("MoE with ep_size > 1 and sparse_gradients is not supported")


# ---------------------------------------------------------------------------------------------- views


class CheckpointView:
    """What ``core.checkpointing.save`` reads of an engine, with the expert units in global layouts."""

    def __init__(self, engine: Any, layouts: dict[str, FlatLayout]) -> None:
        self.plan = dataclasses.replace(engine.plan, layouts=layouts, unit_groups={})
        self.optimizer, self.config, self.mesh = engine.optimizer, engine.config, engine.mesh
        self.device, self.group = engine.device, engine.group


def checkpoint_view(engine: Any, state: Any) -> tuple[CheckpointView, Any]:
    """(a view of ``engine`` whose expert units hold every expert under global names, ``state``'s master
    and flat optimizer leaves in those layouts: this rank's shard of each, or at stage 0 the whole
    buffer). Collective over the expert groups."""
    from zerostep.core.checkpointing import _flat_group, _leaf_key

    units: ExpertUnits = engine.expert_units
    plan = engine.plan
    layouts = units.global_layouts(plan.layouts)
    sharded = plan.sharded_master

    def to_global(g: str, part: torch.Tensor) -> torch.Tensor:
        if g not in units:
            return part
        local = part.to(engine.device).contiguous()
        if sharded:  # this rank's shard -> the whole local buffer, over the unit's own group
            local = all_gather_flat(local, plan.group_of(g, engine.group))
        tensors = units.global_tensors(g, local, plan.layouts[g])
        flat = layouts[g].flatten(tensors, dtype=part.dtype)  # [global padded_numel]
        return layouts[g].shard(flat, plan.rank).clone() if sharded else flat

    master = {g: to_global(g, m) for g, m in state.master.items()}
    paths, leaves, spec = optree.tree_flatten_with_path(state.opt_state)
    converted = []
    for path, leaf in zip(paths, leaves):
        g = _flat_group(_leaf_key(path), leaf, state.master)
        converted.append(to_global(g, leaf) if g is not None else leaf)
    opt_state = optree.tree_unflatten(spec, converted)
    return CheckpointView(engine, layouts), state.replace(master=master, opt_state=opt_state)
