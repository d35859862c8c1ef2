"""``engine.save`` / ``engine.load``: a ``TrainState`` to and from ``zerostep.io`` sharded checkpoints.

What is written per rank (leaf paths as ``zerostep.io`` sees them):

- ``master/<group>``: this rank's part of the group's fp32 flat buffer, a *flat* leaf of the group's
  logical element count. At stage 0 every rank holds the whole buffer and writes only its own slice, so
  nothing is written twice and every stage's checkpoint has the same shape.
- ``opt_state/<path>``: the optimizer state; leaves shaped like a master shard are flat leaves too,
  the rest (step counts) are replicated.
- ``step``, ``skipped_steps``, ``seed``, ``scaler/*``, ``metrics/*`` and ``client_state``: replicated.

Compute-dtype parameters are not written: they are the master cast down, rebuilt on load. The manifest's
meta holds the stage, world size, step, config and the layouts (group -> entries), which is what
``zerostep checkpoint export`` consolidates from. Loading reads each flat leaf's range for this rank at
the *current* world size and stage, so a checkpoint loads anywhere with no conversion step.
"""

from __future__ import annotations

import os
from typing import Any

import optree
import torch

from zerostep.core.precision import ScalerState
from zerostep.core.state import FlatParams, Metrics, TrainState
from zerostep.io import CheckpointError, load_checkpoint, save_checkpoint
from zerostep.io.checkpoint import SaveHandle
from zerostep.io.manifest import CheckpointDir
from zerostep.parallel.collectives import all_gather_flat

FORMAT = "zerostep-train-state/1"


def _layouts_meta(layouts) -> dict:
    return {
        g: {"dtype": "float32", "entries": [[e.name, list(e.shape), e.offset] for e in lay.entries]}
        for g, lay in layouts.items()
    }


def _leaf_key(path: tuple) -> str:
    return "/".join(str(p) for p in path) or "value"


def _opt_leaves(opt_state: Any) -> dict[str, Any]:
    paths, leaves, _ = optree.tree_flatten_with_path(opt_state)
    return {_leaf_key(path): leaf for path, leaf in zip(paths, leaves)}


def _flat_group(path: str, leaf: Any, master: dict[str, torch.Tensor]) -> str | None:
    """The group whose flat buffer an optimizer-state leaf mirrors, or None (a replicated leaf such as a
    step count). Optimizer states keep per-group dicts, so the group is the path's last part (earlier
    parts are field indices, which may look like group names), and the leaf has the master's shape."""
    g = path.rsplit("/", 1)[-1]
    if g in master and isinstance(leaf, torch.Tensor) and leaf.shape == master[g].shape:
        return g
    return None


def save(
    engine: Any,
    state: TrainState,
    save_dir: str | os.PathLike,
    tag: str | None = None,
    client_state: dict | None = None,
    *,
    keep_last: int | None = None,
    async_save: bool = False,
    fsync: bool = True,
) -> SaveHandle:
    plan = engine.plan
    step = int(state.step)
    tag = tag or f"global_step{step}"

    def own(g: str, t: torch.Tensor) -> torch.Tensor:
        # stage 0 (or world size 1) keeps the whole padded buffer: write this rank's slice of it
        return t if plan.sharded_master else plan.layouts[g].shard(t, plan.rank)

    flat_numel: dict[str, int] = {}
    master = {}
    for g, t in state.master.items():
        master[g] = own(g, t)
        flat_numel[f"master/{g}"] = plan.layouts[g].numel
    opt = {}
    for path, leaf in _opt_leaves(state.opt_state).items():
        g = _flat_group(path, leaf, state.master)
        if g is not None:
            opt[path] = own(g, leaf)
            flat_numel[f"opt_state/{path}"] = plan.layouts[g].numel
        else:
            opt[path] = leaf
    tree = {
        "step": state.step,
        "skipped_steps": state.skipped_steps,
        "seed": state.seed,
        "master": master,
        "opt_state": opt,
        "scaler": state.scaler._asdict(),
        "metrics": state.metrics._asdict(),
        "client_state": client_state or {},
    }
    meta = {
        "format": FORMAT,
        "step": step,
        "zero_stage": plan.stage,
        "world_size": plan.world_size,
        "compute_dtype": str(plan.compute_dtype).removeprefix("torch."),
        "optimizer": engine.optimizer.name,
        "config": engine.config.to_dict(),
        "layouts": _layouts_meta(plan.layouts),
    }
    return save_checkpoint(
        save_dir,
        tag,
        tree,
        flat_numel=flat_numel,
        meta=meta,
        rank=plan.rank,
        world_size=plan.world_size,
        keep_last=keep_last,
        fsync=fsync,
        async_save=async_save,
    )


def _check_model_matches(engine: Any, meta: dict, where: str) -> None:
    saved = meta.get("layouts")
    if not isinstance(saved, dict):
        raise CheckpointError(where, "manifest has no parameter layouts; not a zerostep train state")
    want = {e.name: (g, e.shape) for g, lay in engine.plan.layouts.items() for e in lay.entries}
    have = {n: (g, tuple(shape)) for g, lay in saved.items() for n, shape, _ in lay["entries"]}
    problems = [f"missing from checkpoint: {n}" for n in want.keys() - have.keys()]
    problems += [f"not in the model: {n}" for n in have.keys() - want.keys()]
    for n in want.keys() & have.keys():
        if want[n][1] != have[n][1]:
            problems.append(f"{n}: checkpoint shape {have[n][1]} vs model shape {want[n][1]}")
        elif want[n][0] != have[n][0]:
            problems.append(f"{n}: saved in group {have[n][0]!r}, the model puts it in {want[n][0]!r}")
    if problems:
        shown = "; ".join(sorted(problems)[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise CheckpointError(where, f"checkpoint does not match the model: {shown}{more}")


def _resolve(load_dir: str | os.PathLike, tag: str | None) -> tuple[str, dict]:
    with CheckpointDir.open(load_dir, tag) as ckpt:
        return ckpt.path, ckpt.manifest["meta"]


def load(
    engine: Any,
    load_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    load_optimizer_states: bool = True,
) -> tuple[TrainState, dict]:
    """(state, client_state). ``load_optimizer_states=False`` loads parameters only (fine-tuning): a
    fresh optimizer state, loss scaler, step 0."""
    plan = engine.plan
    where, meta = _resolve(load_dir, tag)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            where, f"not a zerostep train state (format {meta.get('format')!r}, want {FORMAT})"
        )
    _check_model_matches(engine, meta, where)
    full = not plan.sharded_master
    # The flat leaves at this world size: whole buffers (read as rank 0 of 1) or this rank's shard.
    rank, world = (0, 1) if full else (plan.rank, plan.world_size)
    wanted = None if load_optimizer_states else ["master"]
    tree, _ = load_checkpoint(load_dir, os.path.basename(where), rank=rank, world_size=world, leaves=wanted)

    device = engine.device

    def place(g: str, t: torch.Tensor) -> torch.Tensor:
        lay = plan.layouts[g]
        length = lay.padded_numel if full else lay.shard_numel
        if t.numel() < length:  # whole buffer read at size numel: pad to this world size's padding
            t = torch.cat([t, t.new_zeros(length - t.numel())])
        return t.to(device).contiguous()

    master = {g: place(g, tree["master"][g]) for g in plan.layouts}
    params = {}
    for g, m in master.items():
        if plan.params_alias_master:
            params[g] = m
        elif plan.params_match_master:
            params[g] = m.to(plan.compute_dtype)
        else:
            params[g] = all_gather_flat(m, engine.group).to(plan.compute_dtype)
    template = engine.optimizer.init(master)
    if not load_optimizer_states:
        return engine.state_from(master, params, opt_state=template), {}
    saved_opt = tree["opt_state"]
    paths, leaves, spec = optree.tree_flatten_with_path(template)
    restored = []
    for path, leaf in zip(paths, leaves):
        key = _leaf_key(path)
        if key not in saved_opt:
            raise CheckpointError(
                where, f"optimizer state leaf {key!r} missing (saved with another optimizer?)"
            )
        value = saved_opt[key]
        g = _flat_group(key, leaf, master)
        if g is not None:
            value = place(g, value)
        restored.append(
            value.to(device=leaf.device, dtype=leaf.dtype) if isinstance(value, torch.Tensor) else value
        )
    scaler = ScalerState(**{k: v.clone() for k, v in tree["scaler"].items()})
    metrics = Metrics(**{k: v.clone() for k, v in tree["metrics"].items()})
    state = TrainState(
        step=tree["step"].clone(),
        skipped_steps=tree["skipped_steps"].clone(),
        seed=tree["seed"].clone(),
        params=FlatParams(params, dict(plan.layouts), sharded=plan.stage == 3),
        master=master,
        opt_state=optree.tree_unflatten(spec, restored),
        scaler=scaler,
        metrics=metrics,
    )
    return state, tree.get("client_state") or {}
