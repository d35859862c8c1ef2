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
from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.distributed as dist

from zerostep.core.precision import ScalerState, loss_scale_init
from zerostep.core.state import FlatParams, Metrics, TrainState, check_not_consumed, mark_consumed
from zerostep.io import CheckpointError, load_checkpoint, save_checkpoint
from zerostep.io.checkpoint import LostContact, SaveHandle, group_timeout_s
from zerostep.io.codec import dtype_from_name
from zerostep.io.manifest import CheckpointDir, selected
from zerostep.io.reshard import read_flat_moved, read_flat_range
from zerostep.parallel.collectives import all_gather_flat

FORMAT = "zerostep-train-state/1"


def _layouts_meta(layouts, master_dtype: torch.dtype = torch.float32) -> dict:
    dtype = str(master_dtype).removeprefix("torch.")  # the master's: a checkpoint loads into any
    return {
        g: {"dtype": dtype, "entries": [[e.name, list(e.shape), e.offset] for e in lay.entries]}
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
    update_latest: bool = True,
    group: Any = None,
) -> SaveHandle:
    """``group``: the saving ranks' own gloo group when they are not the world (core/mp_checkpoint.py)."""
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
        flat_numel[f"master/{g}"] = plan.layouts[g].extent  # entries and the gaps between them
    opt = {}
    for path, leaf in _opt_leaves(state.opt_state).items():
        g = _flat_group(path, leaf, state.master)
        if g is not None:
            opt[path] = own(g, leaf)
            flat_numel[f"opt_state/{path}"] = plan.layouts[g].extent
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
        "optimizer_hyperparams": _plain_values(engine.optimizer.hyperparams),
        "config": engine.config.to_dict(),
        "layouts": _layouts_meta(plan.layouts, plan.master_dtype),
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
        update_latest=update_latest,
        group=group,
    )


def _plain_values(hyperparams: Any) -> dict:
    """The hyperparameters a manifest can hold: numbers, strings, booleans and sequences of them (a
    torch optimizer's keywords or Muon's may hold callables, which are left out)."""

    def plain(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return all(map(plain, v))
        return v is None or (isinstance(v, int) and -(2**63) <= v < 2**64) or isinstance(v, (float, str))

    return {str(k): v for k, v in dict(hyperparams or {}).items() if plain(v)}


def _experts(engine: Any) -> Any:
    """The engine's MoE expert units (core/expert_units.py), or an empty mapping."""
    return getattr(engine, "expert_units", None) or {}


def _named_layouts(engine: Any) -> dict:
    """The layouts a checkpoint of this engine is written in: the plan's, with MoE expert units holding
    every expert under its global name (core/expert_units.py)."""
    experts = _experts(engine)
    return experts.global_layouts(engine.plan.layouts) if experts else engine.plan.layouts


def _check_model_matches(engine: Any, meta: dict, where: str) -> None:
    saved = meta.get("layouts")
    if not isinstance(saved, dict):
        raise CheckpointError(where, "manifest has no parameter layouts; not a zerostep train state")
    experts = _experts(engine)
    if experts:
        problem = experts.check_saved(saved, where)
        if problem is not None:
            raise CheckpointError(where, problem)
    want = {e.name: (g, e.shape) for g, lay in _named_layouts(engine).items() for e in lay.entries}
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


Moves = dict[str, tuple[tuple[int, int, int], ...]]


def _moved_entries(engine: Any, meta: dict) -> Moves:
    """Group -> ``(offset here, offset saved, numel)`` per entry, for the groups whose saved entries sit
    at other offsets than this engine's layout puts them: a checkpoint written before entries and shards
    were aligned (zerostep's back-to-back packing), read entry by entry. Checked to match the model."""
    out = {}
    experts = _experts(engine)
    for g, lay in engine.plan.layouts.items():
        saved = {n: int(offset) for n, _, offset in meta["layouts"][g]["entries"]}
        unit = experts.get(g)
        if unit is not None:  # this rank's local experts, read from their global entries
            out[g] = tuple((e.offset, saved[unit.global_name(e.name)], e.numel) for e in lay.entries)
            continue
        moves = tuple((e.offset, saved[e.name], e.numel) for e in lay.entries)
        if any(here != there for here, there, _ in moves):
            out[g] = moves
    return out


def _moved_leaf(path: str, kind: str, moved: Moves) -> tuple[tuple[int, int, int], ...] | None:
    """The moves of flat leaf ``path`` (``master/<group>``, ``opt_state/.../<group>``) if its group moved."""
    return moved.get(path.rsplit("/", 1)[-1]) if kind == "flat" else None


def _read_part(
    ckpt: CheckpointDir, path: str, start: int, out_or_n: torch.Tensor | int, moved: Moves, **kw: Any
) -> None:
    """Elements [start, start + n) of flat leaf ``path`` as this engine lays it out, into ``out`` (or only
    checked, given a count)."""
    out = out_or_n if isinstance(out_or_n, torch.Tensor) else None
    stop = start + (out.numel() if out is not None else out_or_n)
    moves = _moved_leaf(path, ckpt.leaves[path]["kind"], moved)
    if moves is None:
        read_flat_range(ckpt, path, start, stop, out, **kw)
    else:
        read_flat_moved(ckpt, path, moves, start, stop, out, **kw)


def _check_optimizer_matches(engine: Any, meta: dict, where: str) -> None:
    """The checkpoint's optimizer state is this engine's optimizer's: the same type after DeepSpeed's
    aliasing (``Adam`` is ``adamw`` unless ``adam_w_mode`` is false), which fixes the state's leaves
    and what they mean. Other hyperparameters (lr, betas, weight decay...) may change on resume. The one
    cross-type pair that is the same optimizer is Adam without weight decay and AdamW: the L2 term is
    what makes Adam's moments differ from AdamW's."""
    saved, have = meta.get("optimizer"), engine.optimizer.name
    if saved == have:
        return
    detail = ""
    if {saved, have} == {"adam", "adamw"}:
        l2 = meta.get("optimizer_hyperparams") if saved == "adam" else engine.optimizer.hyperparams
        decay = l2.get("weight_decay") if isinstance(l2, dict) else None
        if decay == 0:
            return
        detail = (
            f" (Adam's L2 weight decay of {decay} enters its moments, AdamW's does not)"
            if decay is not None
            else " (the checkpoint does not record Adam's weight decay)"
        )
    raise CheckpointError(
        where,
        f"saved with optimizer {saved!r}, this engine's optimizer is {have!r}{detail}: that state is not "
        f"{have}'s; pass load_optimizer_states=False to load the parameters with a fresh {have} state",
    )


def _scaler(engine: Any, meta: dict, saved: dict) -> ScalerState:
    """The saved loss-scaler state when the checkpoint and the engine agree on fp16; otherwise the
    engine's first state (an fp32 or bf16 run's scale of 1 is no fp16 scale, and an fp16 scale has no
    use without fp16), as a fresh fp16 run starts at its configured initial scale."""
    fp16 = engine.plan.compute_dtype == torch.float16
    if (meta.get("compute_dtype") == "float16") != fp16:
        return loss_scale_init(engine.loss_scaling)
    return ScalerState(**{k: v.clone() for k, v in saved.items()})


def _master_numel(plan: Any, g: str) -> int:
    """Elements of group ``g``'s master buffer on this rank: the whole padded buffer, or this rank's
    shard when the master is sharded."""
    lay = plan.layouts[g]
    return lay.shard_numel if plan.sharded_master else lay.padded_numel


def _read_as(plan: Any) -> tuple[int, int]:
    """(rank, world size) to read flat leaves as: this rank's shard, or the whole buffer (rank 0 of 1)."""
    return (plan.rank, plan.world_size) if plan.sharded_master else (0, 1)


def _missing_opt_leaf(where: str, key: str) -> CheckpointError:
    return CheckpointError(where, f"optimizer state leaf {key!r} missing (saved with another optimizer?)")


def _agreed(engine: Any, where: str, read: Callable[[], Any]) -> Any:
    """``read()`` on every rank, then a vote: when it raised on any rank, it raises on every rank (the
    others say another rank failed), so no rank goes on to write buffers or wait in a collective that a
    failed rank will never join. A vote that fails (a rank died, or did not answer within the group's
    timeout) raises ``LostContact``, a ``CheckpointError``, on the ranks that are left."""
    error: BaseException | None = None
    result = None
    try:
        result = read()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the vote
        error = e
    if engine.plan.world_size > 1:
        ok = torch.tensor([0 if error else 1], dtype=torch.int32, device=engine.device)
        try:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=engine.group)
        except RuntimeError as e:  # gloo's errors: connection closed or reset, or timed out
            if error is not None:
                raise error from e
            waited = group_timeout_s(engine.group)
            raise LostContact(
                where,
                "nothing was loaded: lost contact with the other ranks while agreeing that every rank "
                f"read its part (one died, or did not answer within {waited:g} s): {e}",
            ) from e
        if error is None and int(ok.item()) == 0:
            raise CheckpointError(
                where, "another rank could not read its part (its error says why); nothing was loaded"
            )
    if error is not None:
        raise error
    return result


def _check_into(engine: Any, into: TrainState) -> None:
    """``ValueError`` listing how ``into`` differs from a state of this engine, before anything is read."""
    plan = engine.plan
    device = torch.device(engine.master_device).type  # the host with offload_optimizer
    problems = []
    if set(into.master) != set(plan.layouts) or set(into.params.layouts) != set(plan.layouts):
        problems.append(f"groups {sorted(into.master)}, this engine has {sorted(plan.layouts)}")
    elif into.params.sharded != (plan.stage == 3):
        kind = lambda sharded: "sharded" if sharded else "whole"  # noqa: E731
        problems.append(
            f"the state's parameters are {kind(into.params.sharded)}, this engine's (stage {plan.stage}) "
            f"are {kind(plan.stage == 3)}"
        )
    else:
        flats = into.params.flats
        for g, lay in plan.layouts.items():
            m, p = into.master[g], flats[g]
            length = _master_numel(plan, g)
            if tuple(m.shape) != (length,) or m.dtype != plan.master_dtype or m.device.type != device:
                have = f"{m.dtype} {list(m.shape)} on {m.device}"
                problems.append(f"master {g!r} is {have}, want {plan.master_dtype} [{length}] on {device}")
            plen = length if plan.params_match_master else lay.padded_numel
            alias_ok = (p is m) == plan.params_alias_master
            if not alias_ok or tuple(p.shape) != (plen,) or p.dtype != plan.compute_dtype:
                how = "" if alias_ok else " (the master itself)" if p is m else " (not the master)"
                have, want = f"{p.dtype} {list(p.shape)}{how}", f"{plan.compute_dtype} [{plen}]"
                problems.append(f"parameters {g!r} are {have}, want {want}")
    if not problems:
        meta = {g: torch.empty_like(m, device="meta") for g, m in into.master.items()}
        want = engine.init_optimizer_state(meta)
        if optree.tree_structure(want) != optree.tree_structure(into.opt_state):
            problems.append(f"optimizer state is not {engine.optimizer.name}'s")
        else:
            pairs = zip(optree.tree_leaves(want), optree.tree_leaves(into.opt_state))
            for key, (a, b) in zip(_opt_leaves(want), pairs):
                if isinstance(a, torch.Tensor) and (
                    not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype
                ):
                    problems.append(f"optimizer state leaf {key!r} is not shaped like this engine's")
    if problems:
        raise ValueError("engine.load(into=): the state is not one of this engine's: " + "; ".join(problems))


def _in_place_targets(engine: Any, into: TrainState, with_optimizer: bool) -> dict[str, torch.Tensor]:
    """Checkpoint leaf path -> the buffer of ``into`` it is read into: the master's flat buffers, and
    the optimizer state's (leaves shaped like a master buffer)."""
    fills = {f"master/{g}": m for g, m in into.master.items()}
    if with_optimizer:
        for key, leaf in _opt_leaves(into.opt_state).items():
            if _flat_group(key, leaf, into.master) is not None:
                fills[f"opt_state/{key}"] = leaf
    return fills


def _flat_start(engine: Any, path: str, t: torch.Tensor) -> int:
    """Where this rank's part of flat leaf ``path`` (``master/<group>``, ``opt_state/.../<group>``)
    starts in its group's buffer: rank r of the group's ranks holds [r * S, (r + 1) * S), S its numel
    (MoE experts: r is the rank in their expert-data-parallel group); an unsharded master holds the
    whole padded buffer."""
    plan = engine.plan
    g = path.rsplit("/", 1)[-1]
    rank = plan.unit_rank(g) if g in plan.layouts else plan.rank
    return (rank if plan.sharded_master else 0) * t.numel()


def _check_flat_leaves(
    engine: Any, ckpt: CheckpointDir, fills: dict[str, torch.Tensor], moved: Moves
) -> None:
    """Every flat leaf ``fills`` reads is in the checkpoint, and its ranges pass their checksums."""
    for path, t in fills.items():
        if ckpt.leaves.get(path, {}).get("kind") != "flat":
            if path.startswith("opt_state/"):
                raise _missing_opt_leaf(ckpt.path, path.removeprefix("opt_state/"))
            raise CheckpointError(ckpt.path, f"leaf {path!r} missing")
        _read_part(ckpt, path, _flat_start(engine, path, t), t.numel(), moved, verify=True)


def _fill_in_place(engine: Any, ckpt: CheckpointDir, fills: dict[str, torch.Tensor], moved: Moves) -> None:
    """Read each flat leaf into its buffer, checksummed again as it lands. Buffers on another device, or
    of another dtype than saved, go through one host tensor at a time."""
    for path, t in fills.items():
        saved = dtype_from_name(ckpt.leaves[path]["dtype"])
        direct = t.device.type == "cpu" and t.is_contiguous() and t.dtype == saved
        host = t if direct else torch.empty(t.numel(), dtype=saved)
        _read_part(ckpt, path, _flat_start(engine, path, t), host, moved, verify=True, in_place=direct)
        if direct:  # written behind autograd's back: let it know, as an in-place op would
            torch.autograd.graph.increment_version(t)
        else:
            t.copy_(host)


def _opened(
    engine: Any, load_dir: str | os.PathLike, tag: str | None, into: TrainState | None, with_optimizer: bool
) -> tuple[str, dict]:
    """The checkpoint's folder and meta, after every check that needs no tensor: ``into`` is a state of
    this engine, the checkpoint is a train state of this model, and of this optimizer if its state is
    loaded. Runs on every rank inside the load's vote, so a rank that sees another folder (or none)
    fails every rank's load, not just its own."""
    if into is not None:
        _check_into(engine, into)
    with CheckpointDir.open(load_dir, tag) as ckpt:
        where, meta = ckpt.path, ckpt.manifest["meta"]
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            where, f"not a zerostep train state (format {meta.get('format')!r}, want {FORMAT})"
        )
    _check_model_matches(engine, meta, where)
    if with_optimizer:
        _check_optimizer_matches(engine, meta, where)
    return where, meta


def load(
    engine: Any,
    load_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    load_optimizer_states: bool = True,
    into: TrainState | None = None,
) -> tuple[TrainState, dict]:
    """(state, client_state). ``load_optimizer_states=False`` loads parameters only (fine-tuning): a
    fresh optimizer state, loss scaler, step 0. ``into``: see ``_load_into``. Every rank checks and
    reads, then all vote: a load fails on every rank or on none (``_agreed``)."""
    if into is not None:
        check_not_consumed(into, "engine.load")
    plan = engine.plan
    named = os.path.join(os.fspath(load_dir), tag) if tag else os.fspath(load_dir)
    prepare = lambda: _opened(engine, load_dir, tag, into, load_optimizer_states)  # noqa: E731
    if into is not None:
        return _load_into(engine, load_dir, named, prepare, into, load_optimizer_states)
    rank, world = _read_as(plan)
    wanted = None if load_optimizer_states else ["master"]

    def read() -> tuple[str, dict, Any]:
        where, meta = prepare()
        tag, moved = os.path.basename(where), _moved_entries(engine, meta)
        if not moved:
            tree, _ = load_checkpoint(load_dir, tag, rank=rank, world_size=world, leaves=wanted)
            return where, meta, tree
        relaid = {}  # flat leaves of moved groups, read entry by entry at this rank's range
        with CheckpointDir.open(load_dir, tag) as ckpt:
            for path, entry in ckpt.leaves.items():
                if selected(path, wanted) and _moved_leaf(path, entry["kind"], moved) is not None:
                    t = torch.empty(
                        _master_numel(plan, path.rsplit("/", 1)[-1]), dtype=dtype_from_name(entry["dtype"])
                    )
                    _read_part(ckpt, path, _flat_start(engine, path, t), t, moved, verify=True)
                    relaid[path] = t
            rest = [p for p in ckpt.leaves if selected(p, wanted) and p not in relaid]
        tree, _ = load_checkpoint(load_dir, tag, rank=rank, world_size=world, leaves=rest)
        for path, t in relaid.items():
            top, key = path.split("/", 1)
            tree[top][key] = t
        return where, meta, tree

    where, meta, tree = _agreed(engine, named, read)

    def place(g: str, t: torch.Tensor) -> torch.Tensor:
        length = _master_numel(plan, g)
        if t.numel() < length:  # whole buffer read at size numel: pad to this world size's padding
            t = torch.cat([t, t.new_zeros(length - t.numel())])
        return t.to(engine.device).contiguous()

    master = {g: place(g, tree["master"][g]).to(plan.master_dtype) for g in plan.layouts}
    params = _params_from(engine, master, None)
    if not load_optimizer_states:
        return engine.state_from(master, params), {}
    template = engine.init_optimizer_state(master)  # this engine's dtypes, whatever was saved
    opt_state = _restored_opt_state(template, tree["opt_state"], master, place, where, {})
    return _assemble(engine, meta, tree, master, params, opt_state), tree.get("client_state") or {}


def _load_into(
    engine: Any,
    load_dir: str | os.PathLike,
    named: str,
    prepare: Callable[[], tuple[str, dict]],
    into: TrainState,
    load_optimizer_states: bool,
) -> tuple[TrainState, dict]:
    """Load into ``into``'s buffers (checked by ``_check_into``), as DeepSpeed's and DCP's loads do: the
    master and optimizer flat buffers are filled, the parameter buffers rebuilt, and the state is
    donated (consumed), so a resume holds one copy of the model state. Every check runs on every rank
    and the ranks agree before the first byte is written: a checkpoint that fails one leaves ``into``
    as it was, on every rank. A failure after writing began (an I/O error, a collective) leaves it
    consumed, never half-loaded and usable. Without optimizer states, ``into``'s optimizer buffers are
    dropped for a fresh optimizer state, as in a params-only load into new memory."""
    plan = engine.plan
    rank, world = _read_as(plan)
    opened: list[CheckpointDir] = []  # the check's open checkpoint, which the fill reads from

    def check() -> tuple[str, dict, dict[str, torch.Tensor], Any]:
        where, meta = prepare()  # ``into`` checked first: the targets below rely on it
        tag = os.path.basename(where)
        fills = _in_place_targets(engine, into, load_optimizer_states)
        small = None
        if load_optimizer_states:  # step counts, scaler, metrics, client state: small, read here
            wanted = ["step", "skipped_steps", "seed", "scaler", "metrics", "client_state"]
            rest = [k for k in _opt_leaves(into.opt_state) if f"opt_state/{k}" not in fills]
            wanted += [f"opt_state/{k}" for k in rest]
            small, _ = load_checkpoint(load_dir, tag, rank=rank, world_size=world, leaves=wanted)
            missing = [k for k in rest if k not in small["opt_state"]]
            if missing:
                raise _missing_opt_leaf(where, missing[0])
        opened.append(CheckpointDir.open(load_dir, tag))
        _check_flat_leaves(engine, opened[0], fills, _moved_entries(engine, meta))
        return where, meta, fills, small

    try:
        where, meta, fills, small = _agreed(engine, named, check)
    except BaseException:
        if opened:
            opened[0].close()
        raise
    loaded = False
    try:
        with opened[0] as ckpt:
            _fill_in_place(engine, ckpt, fills, _moved_entries(engine, meta))
        master = {g: fills[f"master/{g}"] for g in plan.layouts}
        params = _params_from(engine, master, into.params.flats)
        if not load_optimizer_states:
            state, client = engine.state_from(master, params), {}
        else:
            filled = {k: t for k, t in fills.items() if k.startswith("opt_state/")}
            opt_state = _restored_opt_state(into.opt_state, small["opt_state"], master, None, where, filled)
            state = _assemble(engine, meta, small, master, params, opt_state)
            client = small.get("client_state") or {}
        loaded = True
    finally:
        # loaded or half-loaded: either way, not to be used again
        mark_consumed(
            into,
            f"this TrainState was loaded into from {where}, and its buffers now belong to the state that "
            "load returned; use that one"
            if loaded
            else f"a load from {where} into this TrainState failed after it began overwriting its buffers, "
            "so they may hold parts of both: load again into a fresh engine.init() state",
        )
    return state, client


def _restored_opt_state(
    template: Any,
    saved: dict[str, Any],
    master: dict[str, torch.Tensor],
    place: Callable[[str, torch.Tensor], torch.Tensor] | None,
    where: str,
    filled: dict[str, torch.Tensor],
) -> Any:
    """``template``'s structure with every leaf from the checkpoint: ``filled`` ones (already read in
    place, keyed ``opt_state/<path>``) as they are, flat ones through ``place``, the rest cast to the
    template leaf's device and dtype."""
    paths, leaves, spec = optree.tree_flatten_with_path(template)
    restored = []
    for path, leaf in zip(paths, leaves):
        key = _leaf_key(path)
        if f"opt_state/{key}" in filled:
            restored.append(filled[f"opt_state/{key}"])
            continue
        if key not in saved:
            raise _missing_opt_leaf(where, key)
        value = saved[key]
        g = _flat_group(key, leaf, master)
        if g is not None and place is not None:
            value = place(g, value)
        restored.append(
            value.to(device=leaf.device, dtype=leaf.dtype) if isinstance(value, torch.Tensor) else value
        )
    return optree.tree_unflatten(spec, restored)


def _assemble(
    engine: Any,
    meta: dict,
    tree: dict,
    master: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    opt_state: Any,
) -> TrainState:
    plan = engine.plan
    return TrainState(
        step=tree["step"].clone(),
        skipped_steps=tree["skipped_steps"].clone(),
        seed=tree["seed"].clone(),
        params=FlatParams(params, dict(plan.layouts), sharded=plan.stage == 3),
        master=master,
        opt_state=opt_state,
        scaler=_scaler(engine, meta, tree["scaler"]),
        metrics=Metrics(**{k: v.clone() for k, v in tree["metrics"].items()}),
    )


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
        value = m if plan.params_match_master else all_gather_flat(m, plan.group_of(g, engine.group))
        params[g] = value.to(plan.compute_dtype) if into is None else into[g].copy_(value)
    return params
