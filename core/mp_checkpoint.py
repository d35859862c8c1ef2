"""``engine.save`` / ``engine.load`` over a model-parallel mesh (core/model_parallel.py).

The world mesh goes straight to ``core.checkpointing``. Otherwise the data-parallel group is one replica
of the model and the model-parallel ranks hold different tensors, so:

- **Tensor parallelism (AutoTP)**: the checkpoint holds *full* tensors under the model's own names, the
  checkpoint a one-TP-rank engine of the same model writes. Each master / optimizer-state flat buffer
  is reassembled across the tensor-parallel group (``model_parallel.full_tensors``) into the full-shape
  layout and written, DP-sharded, by the data-parallel group of TP rank 0. A load reads the full buffers
  (each rank the whole of them: memory for one full copy of the model state, transiently) and cuts this
  rank's TP shard and DP part. So a checkpoint saved at TP=2 loads at TP=1 (the ordinary path) and a
  TP=1 checkpoint at TP=2, at any data-parallel size.
- **An mpu's model parallelism** (tensors the engine knows nothing about): each model-parallel rank's
  replica is an ordinary zerostep checkpoint of its own under ``<save_dir>/mp_rank_XX/<tag>`` (DeepSpeed
  names its files by ``mp_rank`` too), written by that rank's data-parallel group; ``<save_dir>/latest``
  is written last, by global rank 0, once every replica is committed. Loading needs the same
  model-parallel size; the data-parallel size may change.

Every rank votes after its part, so a save or load fails on every rank or on none. Saves here are
synchronous (``async_save`` is warned about and ignored): the vote must follow the write.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.distributed as dist

from zerostep.core import checkpointing
from zerostep.core.model_parallel import full_layout, full_shapes, full_tensors, local_tensors
from zerostep.core.state import TrainState, mark_consumed
from zerostep.io import CheckpointError, load_checkpoint
from zerostep.io.checkpoint import write_latest
from zerostep.io.manifest import LATEST
from zerostep.parallel.collectives import all_gather_flat


def mp_dir(save_dir: str | os.PathLike, mp_rank: int) -> str:
    """Where model-parallel rank ``mp_rank``'s replica lives (an mpu's checkpoints)."""
    return os.path.join(os.fspath(save_dir), f"mp_rank_{mp_rank:02d}")


class _FullView:
    """What ``core.checkpointing`` reads of an engine, with the full-shape (TP=1) layouts."""

    def __init__(self, engine: Any, layouts: dict) -> None:
        import dataclasses

        self.plan = dataclasses.replace(engine.plan, layouts=layouts)
        self.optimizer, self.config, self.mesh = engine.optimizer, engine.config, engine.mesh


def _full_layouts(engine: Any) -> dict:
    shapes = full_shapes(engine.tp_specs, engine.plan.layouts)
    return {g: full_layout(lay, shapes) for g, lay in engine.plan.layouts.items()}


def _vote(engine: Any, where: str, run: Callable[[], Any], group: Any = None) -> Any:
    """``run()`` here, then every rank of ``group`` (default: the world) learns whether it raised anywhere."""
    error, result = None, None
    try:
        result = run()
    except Exception as e:  # noqa: BLE001 - re-raised after the vote
        error = e
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    ok = 1
    if size > 1:
        flag = torch.tensor([0 if error else 1], dtype=torch.int32, device=engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        ok = int(flag.item())
    if error is not None:
        raise error
    if not ok:
        raise CheckpointError(where, "another model-parallel rank failed (its error says why)")
    return result


def _no_async(async_save: bool) -> None:
    if async_save:
        warnings.warn(
            "engine.save(async_save=True) with model parallelism runs synchronously: every model-parallel "
            "rank must learn that the others' parts are committed",
            stacklevel=4,
        )


# ---------------------------------------------------------------------------------------------- save


def save(
    engine: Any, state: TrainState, save_dir: str | os.PathLike, tag: str | None, client_state: Any, **kw: Any
) -> Any:
    mesh = engine.mesh
    if mesh.is_world:
        experts = getattr(engine, "expert_units", None)
        if experts is not None and experts.parallel:  # MoE experts under their global names
            from zerostep.core.expert_units import checkpoint_view

            engine, state = checkpoint_view(engine, state)
        return checkpointing.save(engine, state, save_dir, tag, client_state, **kw)
    _no_async(kw.pop("async_save", False))
    tag = tag or f"global_step{int(state.step)}"
    where = os.path.join(os.fspath(save_dir), tag)
    if engine.tp_specs is not None:
        view, full = _full_view_state(engine, state)  # collective over the TP and DP groups
        write = lambda: (  # noqa: E731 - TP rank 0's data-parallel group writes the full tensors
            checkpointing.save(view, full, save_dir, tag, client_state, group=mesh.ckpt_group, **kw)
            if mesh.tp_rank == 0
            else None
        )
        _vote(engine, where, write)
        return _Done(where)
    update_latest = kw.pop("update_latest", True)
    sub = mp_dir(save_dir, mesh.tp_rank)
    _vote(
        engine,
        where,
        lambda: checkpointing.save(
            engine, state, sub, tag, client_state, group=mesh.ckpt_group, update_latest=update_latest, **kw
        ),
    )
    if update_latest:
        _vote(engine, where, lambda: write_latest(save_dir, tag) if mesh.world_rank == 0 else None)
    return _Done(where)


class _Done:
    """The handle of a synchronous save."""

    def __init__(self, path: str) -> None:
        self.path = path

    def wait(self) -> str:
        return self.path


def _full_view_state(engine: Any, state: TrainState) -> tuple[_FullView, TrainState]:
    """(an engine view with full layouts, ``state`` with its master and flat optimizer leaves in them)."""
    plan, mesh, specs = engine.plan, engine.mesh, engine.tp_specs
    layouts = _full_layouts(engine)

    def to_full(g: str, part: torch.Tensor) -> torch.Tensor:
        # part: [shard_numel] (sharded master) or [padded_numel] of the local (TP-shard) layout
        whole = part
        if plan.sharded_master:
            whole = all_gather_flat(part.to(engine.device).contiguous(), engine.group)
        full = full_tensors(mesh, specs, plan.layouts[g].unflatten(whole.to(engine.device)))
        flat = layouts[g].flatten(full, dtype=part.dtype)  # [full padded_numel]
        return layouts[g].shard(flat, plan.rank).clone() if plan.sharded_master else flat

    master = {g: to_full(g, m) for g, m in state.master.items()}
    paths, leaves, spec = optree.tree_flatten_with_path(state.opt_state)
    converted = []
    for path, leaf in zip(paths, leaves):
        g = checkpointing._flat_group(checkpointing._leaf_key(path), leaf, state.master)
        converted.append(to_full(g, leaf) if g is not None else leaf)
    opt_state = optree.tree_unflatten(spec, converted)
    return _FullView(engine, layouts), state.replace(master=master, opt_state=opt_state)


# ---------------------------------------------------------------------------------------------- load


def load(
    engine: Any,
    load_dir: str | os.PathLike,
    tag: str | None,
    *,
    load_optimizer_states: bool = True,
    into: TrainState | None = None,
) -> tuple[TrainState, dict]:
    mesh = engine.mesh
    if mesh.is_world:
        return checkpointing.load(
            engine, load_dir, tag, load_optimizer_states=load_optimizer_states, into=into
        )
    if engine.tp_specs is not None:
        state, client = _load_tp(engine, load_dir, tag, load_optimizer_states)
        if into is not None:  # read into new memory; the donated state is released, as a load into it
            mark_consumed(
                into, f"this TrainState was replaced by a load from {load_dir}; use the returned one"
            )
        return state, client
    top = os.path.join(os.fspath(load_dir), LATEST)
    if tag is None and os.path.isfile(top):
        with open(top, encoding="utf-8") as f:
            tag = f.read().strip()
    sub = mp_dir(load_dir, mesh.tp_rank)
    where = os.path.join(sub, tag or LATEST)

    def read() -> tuple[TrainState, dict]:
        if not os.path.isdir(sub):  # the same answer on every rank of this DP group (one folder)
            found = (
                sorted(n for n in os.listdir(load_dir) if n.startswith("mp_rank_"))
                if os.path.isdir(load_dir)
                else []
            )
            raise CheckpointError(
                where,
                f"no replica for model-parallel rank {mesh.tp_rank} (this engine has {mesh.tp_size} "
                f"model-parallel ranks; the checkpoint holds {found or 'none'}): load at the "
                "model-parallel size it was saved at",
            )
        return checkpointing.load(engine, sub, tag, load_optimizer_states=load_optimizer_states, into=into)

    return _vote(engine, where, read)


def _load_tp(
    engine: Any, load_dir: str | os.PathLike, tag: str | None, with_optimizer: bool
) -> tuple[TrainState, dict]:
    plan, mesh, specs = engine.plan, engine.mesh, engine.tp_specs
    view = _FullView(engine, _full_layouts(engine))
    named = os.path.join(os.fspath(load_dir), tag) if tag else os.fspath(load_dir)

    def read() -> tuple[str, dict, dict]:
        where, meta = checkpointing._opened(view, load_dir, tag, None, with_optimizer)
        wanted = None if with_optimizer else ["master"]
        tree, _ = load_checkpoint(load_dir, os.path.basename(where), rank=0, world_size=1, leaves=wanted)
        return where, meta, tree

    where, meta, tree = _vote(engine, named, read)
    saved_master = tree["master"]

    def to_local(g: str, whole: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # whole: the saved full-layout buffer of group g; -> this rank's part of its local layout
        full = {}
        for name, shape, offset in meta["layouts"][g]["entries"]:
            numel = math.prod(shape)
            full[name] = whole[int(offset) : int(offset) + numel].view(tuple(shape))
        flat = plan.layouts[g].flatten(local_tensors(mesh, specs, full), dtype=dtype)  # [padded_numel]
        part = plan.layouts[g].shard(flat, plan.rank).clone() if plan.sharded_master else flat
        return part.to(engine.device).contiguous()

    master = {g: to_local(g, saved_master[g], plan.master_dtype) for g in plan.layouts}
    params = checkpointing._params_from(engine, master, None)
    if not with_optimizer:
        return engine.state_from(master, params), {}
    opt = {}
    for key, leaf in tree["opt_state"].items():
        g = checkpointing._flat_group(key, leaf, saved_master)
        opt[key] = to_local(g, leaf, leaf.dtype) if g is not None else leaf
    template = engine.init_optimizer_state(master)
    opt_state = checkpointing._restored_opt_state(template, opt, master, None, where, {})
    state = checkpointing._assemble(engine, meta, tree, master, params, opt_state)
    return state, tree.get("client_state") or {}
