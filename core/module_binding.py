"""The user's module holds the state's weights: no hidden copy, no stale weights.

``engine.init`` packs the module's parameters into flat buffers. Leaving the module's own tensors alive
would cost 4 bytes per parameter on every rank (the saving of ZeRO stage 3, nearly cancelled), and a
module that keeps its initial values after training is a trap: ``model.state_dict()`` or
``save_pretrained`` would silently write untrained weights. So once a state exists, the module is bound
to it, as DeepSpeed's engine binds its module:

- stages 0-2: every trainable parameter's ``.data`` becomes its view of the state's compute-dtype flat
  buffer (``state.params``), so ``model(x)``, ``model.state_dict()`` and ``save_pretrained`` read the
  live weights after every step (``engine.step`` updates those buffers in place). As with DeepSpeed's
  ``module.half()`` / ``.bfloat16()``, the module's parameters then have the compute dtype;
- stage 3: each parameter is released to an empty placeholder (``.data`` of 0 elements, the logical shape
  kept in ``ds_shape``, as DeepSpeed's ``zero.Init`` does); ``zerostep.zero.GatheredParameters`` gathers
  the full values where code needs them;
- frozen parameters and floating-point buffers take the compute-dtype tensors the forward already uses
  (``engine._constants``), so the module does not keep a second, differently typed copy.

The module follows the state last produced by ``engine.init`` or ``engine.load`` (``engine.step`` and
``engine.load(into=)`` reuse the same buffers, so nothing needs rebinding then). A process that keeps two
states of one engine sees the later one through the module. ``bound_state_of(param)`` tells which engine
owns a parameter (for ``GatheredParameters``).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zerostep.parallel.collectives import all_gather_flat
from zerostep.parallel.flat import FlatLayout


@dataclass(frozen=True)
class ParamHome:
    """Where a bound parameter's values live: its engine (weakly), its flat group and its name there."""

    engine: Any  # weakref.ref to the core Engine
    group: str
    name: str
    shape: tuple[int, ...]


_HOME = "_zerostep_home"  # attribute of a bound parameter (tensors cannot key a WeakKeyDictionary)


def home_of(param: torch.Tensor) -> ParamHome | None:
    """The engine and flat group ``param`` is bound to, or None when no live engine owns it."""
    home = getattr(param, _HOME, None)
    return home if home is not None and home.engine() is not None else None


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape, also while stage 3 holds it as an empty placeholder."""
    shape = getattr(param, "ds_shape", None)
    return tuple(shape) if shape is not None else tuple(param.shape)


def is_released(param: torch.Tensor) -> bool:
    return getattr(param, "ds_shape", None) is not None and param.numel() != math.prod(param.ds_shape)


def current_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's current value by name: the tensor itself, or for a stage-3 placeholder the fp32
    values gathered from the master of the engine that released it (a collective on its group)."""
    out: dict[str, torch.Tensor] = {}
    gathered: dict[int, dict[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not is_released(p):
            out[name] = p
            continue
        home = home_of(p)
        engine = home.engine() if home is not None else None
        master = engine.bound_master if engine is not None else None
        if master is None:
            raise ValueError(
                f"parameter {name!r} is a stage-3 placeholder whose engine or state is gone; build the "
                "model afresh or load its weights from a checkpoint"
            )
        if id(engine) not in gathered:
            gathered[id(engine)] = gathered_master(engine, master)
        out[name] = gathered[id(engine)][home.name]
    return out


def gathered_master(engine: Any, master: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name -> fp32 view of the gathered master buffers of ``engine`` (a collective when sharded)."""
    out: dict[str, torch.Tensor] = {}
    for g, shard in master.items():
        sharded = engine.plan.sharded_master  # an offloaded master shard is gathered on the device
        group = engine.plan.group_of(g, engine.group)  # MoE experts: their expert-data-parallel group
        full = all_gather_flat(shard.to(engine.device).contiguous(), group) if sharded else shard
        out.update(engine.plan.layouts[g].unflatten(full))
    return out


def bind_module(
    engine: Any,
    model: nn.Module,
    layouts: dict[str, FlatLayout],
    flats: dict[str, torch.Tensor],
    constants: dict[str, torch.Tensor],
    sharded: bool,
) -> None:
    """Point ``model``'s parameters at ``flats`` (stages 0-2) or release them (``sharded``: stage 3)."""
    ref = weakref.ref(engine)
    with torch.no_grad():
        for group, layout in layouts.items():
            views = None if sharded else layout.unflatten(flats[group])
            for entry in layout.entries:
                param = model.get_parameter(entry.name)
                if sharded:
                    # on the engine's device even when the shards live in host memory (offload_param)
                    placeholder = torch.empty(0, dtype=flats[group].dtype, device=engine.device)
                    _set_data(param, placeholder)
                    param.ds_shape = entry.shape  # DeepSpeed's name for a released parameter's shape
                    param.ds_numel = entry.numel
                else:
                    _set_data(param, views[entry.name])
                    for attr in ("ds_shape", "ds_numel"):
                        if hasattr(param, attr):
                            delattr(param, attr)
                setattr(param, _HOME, ParamHome(ref, group, entry.name, entry.shape))
        _bind_constants(model, constants)


def _set_data(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.data = value``; a meta parameter (built under ``zero.Init``) cannot take real data that
    way, so it swaps contents with a parameter over ``value``: the object (which optimizers, hooks and
    the script hold) stays the same."""
    if param.is_meta and not value.is_meta:
        torch.utils.swap_tensors(param, nn.Parameter(value, requires_grad=param.requires_grad))
    else:
        param.data = value


def _bind_constants(model: nn.Module, constants: dict[str, torch.Tensor]) -> None:
    """Frozen parameters and buffers: the module keeps the very tensors the forward reads."""
    for name, tensor in constants.items():
        module_path, _, attr = name.rpartition(".")
        module = model.get_submodule(module_path)
        if attr in module._parameters and module._parameters[attr] is not None:
            param = module._parameters[attr]
            if param.data.data_ptr() != tensor.data_ptr() or param.dtype != tensor.dtype:
                param.data = tensor
        elif attr in module._buffers and module._buffers[attr] is not None:
            module._buffers[attr] = tensor


def gather_released(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Give stage-3 placeholders among ``params`` their full values (compute dtype, a new tensor each,
    gathered from their engine's master: a collective, so every rank calls it); returns the ones filled.
    Parameters that are not released (stages 0-2, or not an engine's) are left alone."""
    filled = []
    by_engine: dict[int, tuple[Any, list[torch.Tensor]]] = {}
    for p in params:
        home = home_of(p)
        if home is None or not is_released(p):
            continue
        engine = home.engine()
        by_engine.setdefault(id(engine), (engine, []))[1].append(p)
    for engine, owned in by_engine.values():
        master = engine.bound_master
        if master is None:
            raise ValueError("the state these stage-3 parameters belong to is gone; nothing to gather")
        values = gathered_master(engine, master)
        for p in owned:
            home = home_of(p)
            p.data = values[home.name].to(engine.compute_dtype, copy=True)
            filled.append(p)
    return filled


def release_gathered(params: list[torch.Tensor], modifier_rank: int | None) -> None:
    """Undo ``gather_released``. With ``modifier_rank``, that rank's (possibly modified) values are
    broadcast and written into every rank's master shard and compute-dtype shard first."""
    for p in params:
        home = home_of(p)
        engine = home.engine()
        if modifier_rank is not None:
            _write_back(engine, home, p.data, modifier_rank)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def _write_back(engine: Any, home: ParamHome, value: torch.Tensor, src: int) -> None:
    value = value.detach().to(torch.float32).contiguous()
    if home.group in engine.plan.unit_groups:
        raise NotImplementedError(
            f"{home.name}: writing an MoE expert parameter back through "
            "GatheredParameters(modifier_rank=...) with ep_size > 1 is not supported (the ranks hold "
            "different experts)"
        )
    if engine.world_size > 1:
        dist.broadcast(
            value, src=dist.get_global_rank(engine.group, src) if engine.group else src, group=engine.group
        )
    layout = engine.plan.layouts[home.group]
    entry = next(e for e in layout.entries if e.name == home.name)
    master = engine.bound_master[home.group]
    lo, hi = layout.shard_range(engine.rank) if engine.plan.sharded_master else (0, layout.padded_numel)
    start, stop = max(lo, entry.offset), min(hi, entry.offset + entry.numel)
    if start >= stop:
        return
    flat = value.reshape(-1)[start - entry.offset : stop - entry.offset]
    with torch.no_grad():
        master[start - lo : stop - lo].copy_(flat)
        shard = engine.bound_params[home.group]
        if shard.data_ptr() != master.data_ptr():
            shard[start - lo : stop - lo].copy_(flat)
