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
from zerostep.core.state import FlatParams, Metrics, TrainState, check_not_consumed, mark_consumed
from zerostep.io import CheckpointError, load_checkpoint, save_checkpoint
from zerostep.io.checkpoint import SaveHandle
from zerostep.io.codec import dtype_from_name
from zerostep.io.manifest import CheckpointDir
from zerostep.io.reshard import read_flat_range
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


def _in_place_targets(engine: Any, into: TrainState, with_optimizer: bool) -> dict[str, torch.Tensor]:
    """Checkpoint leaf path -> the buffer of ``into`` it is read into: the master's flat buffers, and
    the optimizer state's (leaves shaped like a master buffer)."""
    plan = engine.plan
    fills: dict[str, torch.Tensor] = {}
    for g, lay in plan.layouts.items():
        m = into.master.get(g)
        length = lay.shard_numel if plan.sharded_master else lay.padded_numel
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != (length,):
            raise ValueError(f"engine.load(into=): the state's master buffer {g!r} is not this engine's")
        fills[f"master/{g}"] = m
    if with_optimizer:
        for key, leaf in _opt_leaves(into.opt_state).items():
            if _flat_group(key, leaf, into.master) is not None:
                fills[f"opt_state/{key}"] = leaf
    return fills


def _fill_in_place(
    engine: Any, load_dir: str | os.PathLike, tag: str, fills: dict[str, torch.Tensor]
) -> None:
    """Read each flat leaf into its buffer (this rank's part at this world size, or the whole padded
    buffer when the master is not sharded). Every range is checksummed before the first byte is
    written, so a damaged checkpoint raises with the buffers untouched. Buffers on another device, or of
    another dtype than saved, go through one host tensor at a time."""
    plan = engine.plan
    with CheckpointDir.open(load_dir, tag) as ckpt:
        for path in fills:
            if ckpt.leaves.get(path, {}).get("kind") != "flat":
                what = "optimizer state leaf" if path.startswith("opt_state/") else "leaf"
                raise CheckpointError(ckpt.path, f"{what} {path!r} missing (saved with another optimizer?)")
        # rank r's part of a flat leaf is elements [r * S, (r + 1) * S)
        start = {path: (plan.rank if plan.sharded_master else 0) * t.numel() for path, t in fills.items()}
        for path, t in fills.items():  # check everything before writing anything
            read_flat_range(ckpt, path, start[path], start[path] + t.numel(), None, verify=True)
        for path, t in fills.items():
            saved = dtype_from_name(ckpt.leaves[path]["dtype"])
            direct = t.device.type == "cpu" and t.is_contiguous() and t.dtype == saved
            host = t if direct else torch.empty(t.numel(), dtype=saved)
            read_flat_range(ckpt, path, start[path], start[path] + t.numel(), host, verify=True)
            if not direct:
                t.copy_(host)


def load(
    engine: Any,
    load_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    load_optimizer_states: bool = True,
    into: TrainState | None = None,
) -> tuple[TrainState, dict]:
    """(state, client_state). ``load_optimizer_states=False`` loads parameters only (fine-tuning): a
    fresh optimizer state, loss scaler, step 0. ``into``: a state of this engine whose buffers are
    filled in place and reused (donated, as ``engine.step`` donates; consumed once the load succeeds)."""
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
    filled: dict[str, torch.Tensor] = {}
    if into is not None:
        check_not_consumed(into, "engine.load")
        filled = _in_place_targets(engine, into, load_optimizer_states)
        # read here: the small leaves (step counts, scaler, metrics, client state), checked before any
        # buffer of ``into`` is written
        wanted = ["step", "skipped_steps", "seed", "scaler", "metrics", "client_state"]
        wanted += [f"opt_state/{k}" for k in _opt_leaves(into.opt_state) if f"opt_state/{k}" not in filled]
    else:
        wanted = None if load_optimizer_states else ["master"]
    tree, _ = load_checkpoint(load_dir, os.path.basename(where), rank=rank, world_size=world, leaves=wanted)
    if into is not None and load_optimizer_states:
        missing = [k for k in _opt_leaves(into.opt_state) if f"opt_state/{k}" not in filled]
        missing = [k for k in missing if k not in tree["opt_state"]]
        if missing:
            raise CheckpointError(
                where, f"optimizer state leaf {missing[0]!r} missing (saved with another optimizer?)"
            )
    if into is not None:
        into.params.wait()  # no gather may still be writing the buffers about to be rebuilt
        _fill_in_place(engine, load_dir, os.path.basename(where), filled)

    device = engine.device

    def place(g: str, t: torch.Tensor) -> torch.Tensor:
        lay = plan.layouts[g]
        length = lay.padded_numel if full else lay.shard_numel
        if t.numel() < length:  # whole buffer read at size numel: pad to this world size's padding
            t = torch.cat([t, t.new_zeros(length - t.numel())])
        return t.to(device).contiguous()

    if into is not None:
        master = {g: filled[f"master/{g}"] for g in plan.layouts}
    else:
        master = {g: place(g, tree["master"][g]) for g in plan.layouts}
    params = _params_from(engine, master, None if into is None else into.params.flats)
    if not load_optimizer_states:
        state = engine.state_from(master, params)
        if into is not None:
            mark_consumed(into)
        return state, {}
    template = engine.optimizer.init(master) if into is None else into.opt_state
    saved_opt = tree["opt_state"]
    paths, leaves, spec = optree.tree_flatten_with_path(template)
    restored = []
    for path, leaf in zip(paths, leaves):
        key = _leaf_key(path)
        if f"opt_state/{key}" in filled:
            restored.append(filled[f"opt_state/{key}"])
            continue
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
    if into is not None:
        mark_consumed(into)
    return state, tree.get("client_state") or {}


def _params_from(
    engine: Any, master: dict[str, torch.Tensor], into: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The compute-dtype buffers for ``master``: the master itself, cast, or gathered and cast; written
    into ``into``'s buffers when given."""
    plan = engine.plan
    params = {}
    for g, m in master.items():
        if plan.params_alias_master:
            params[g] = m
            continue
        value = m if plan.params_match_master else all_gather_flat(m, engine.group)
        params[g] = value.to(plan.compute_dtype) if into is None else into[g].copy_(value)
    return params
