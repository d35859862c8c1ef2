"""Pipeline checkpoints: one msgpack pytree file per stage, loadable at any stage count and dp size.

Layout of ``<save_dir>/<tag>/``::

    stage_00.msgpack ...   written by data-parallel rank 0 of each stage (``zerostep.io.save_pytree``):
                           {"groups": {group: {"master": fp32 [extent], "opt": {field: [extent]}}},
                            "scalars": {field: tensor}, "step", "skipped_steps", "seed",
                            "scaler": {...}, "client_state"}
    pipeline.json          written by global rank 0 once every stage's file is complete: stage count,
                           data-parallel size, which file holds each group

A group (a layer, or a tied module: saved once, by its lowest stage) is stored whole, unpadded, so a
load at any data-parallel size pads and shards it again, and a load at another stage count reads each
of its groups from whichever file holds it (groups are named by global layer index). ``latest`` names
the last complete tag. The tag is written to a temporary folder and renamed into place once every
writer has finished (an older folder of the same tag is moved aside first and deleted after), so a
crash leaves a whole checkpoint under the tag or, between the two renames, under ``.old-<tag>``.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist

from zerostep.core.precision import ScalerState
from zerostep.io import CheckpointError, load_pytree, save_pytree
from zerostep.parallel.collectives import all_gather_flat

MANIFEST = "pipeline.json"


def _fields(opt_state: Any) -> dict[str, Any]:
    if hasattr(opt_state, "_asdict"):
        return dict(opt_state._asdict())
    if isinstance(opt_state, dict):
        return dict(opt_state)
    raise CheckpointError("", f"optimizer state of type {type(opt_state).__name__} cannot be saved per group")


def _rebuild(template: Any, fields: dict[str, Any]) -> Any:
    return type(template)(**fields) if hasattr(template, "_asdict") else fields


def _world() -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(
    engine: Any, state: Any, save_dir: str | os.PathLike, tag: str | None, client_state: dict | None
) -> str:
    """Every rank calls it; returns the checkpoint's folder."""
    mesh, plan = engine.mesh, engine.plan
    tag = tag or f"global_step{int(state.step)}"
    final = os.path.join(os.fspath(save_dir), tag)
    tmp = os.path.join(os.fspath(save_dir), f".tmp-{tag}")
    rank, _ = _world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    gather = plan.sharded_master

    def whole(t: torch.Tensor, g: str) -> torch.Tensor:
        t = all_gather_flat(t, mesh.dp_group) if gather else t
        return t[: engine.layouts[g].extent].detach().cpu().clone()

    fields = _fields(state.opt_state)
    groups: dict[str, Any] = {}
    for g in engine.layouts:
        if g in engine.replicated_groups:
            continue
        opt = {f: whole(v[g], g) for f, v in fields.items() if isinstance(v, dict)}
        groups[g] = {"master": whole(state.master[g], g), "opt": opt}
    if mesh.dp_rank == 0:
        tree = {
            "groups": groups,
            "scalars": {f: v.detach().cpu() for f, v in fields.items() if isinstance(v, torch.Tensor)},
            "step": state.step.cpu(),
            "skipped_steps": state.skipped_steps.cpu(),
            "seed": state.seed.cpu(),
            "scaler": {k: v.cpu() for k, v in state.scaler._asdict().items()},
            "client_state": client_state or {},
        }
        save_pytree(os.path.join(tmp, f"stage_{mesh.stage_id:02d}.msgpack"), tree)
    owners = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    mine = {"stage": mesh.stage_id, "groups": sorted(groups)} if mesh.dp_rank == 0 else None
    if dist.is_initialized():
        dist.all_gather_object(owners, mine)
    else:
        owners = [mine]
    if rank == 0:
        where = {g: f"stage_{o['stage']:02d}.msgpack" for o in owners if o for g in o["groups"]}
        manifest = {
            "format": "zerostep-pipeline",
            "version": 1,
            "num_stages": mesh.num_stages,
            "dp_size": mesh.dp_size,
            "groups": where,
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        old = os.path.join(os.fspath(save_dir), f".old-{tag}")
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):  # moved aside, not deleted, until the new one is in place
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        with open(os.path.join(os.fspath(save_dir), ".latest-tmp"), "w") as f:
            f.write(tag)
        os.replace(
            os.path.join(os.fspath(save_dir), ".latest-tmp"), os.path.join(os.fspath(save_dir), "latest")
        )
    _barrier()
    return final


def _placed(t: torch.Tensor, layout: Any, plan: Any, device: torch.device, where: str) -> torch.Tensor:
    """A saved whole group [extent] in a padded buffer [padded_numel] of this layout's world size."""
    if t.numel() != layout.extent:
        raise CheckpointError(where, f"{t.numel()} values saved, the layout has {layout.extent}")
    full = torch.zeros(layout.padded_numel, dtype=plan.master_dtype, device=device)
    full[: layout.extent] = t.to(full.dtype)
    return full


def load(
    engine: Any, load_dir: str | os.PathLike, tag: str | None, load_optimizer_states: bool = True
) -> tuple[Any, dict, str]:
    """(state, client_state, folder) of a checkpoint saved at any stage count / data-parallel size."""
    load_dir = os.fspath(load_dir)
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.exists(latest):
            raise CheckpointError(latest, "no 'latest' file: pass tag= or save a checkpoint first")
        tag = open(latest).read().strip()
    folder = os.path.join(load_dir, tag)
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"not a zerostep pipeline checkpoint ({e})") from e
    missing = [g for g in engine.layouts if g not in manifest["groups"]]
    if missing:
        raise CheckpointError(
            path, f"the checkpoint has no parameters for group(s) {missing} (another model?)"
        )
    files: dict[str, Any] = {}

    def read(name: str) -> Any:
        if name not in files:
            files[name] = load_pytree(os.path.join(folder, name), mmap=True)
        return files[name]

    plan = engine.plan
    template = engine.optimizer.init({g: torch.zeros(1) for g in engine.layouts})
    fields = _fields(template)
    head = read(sorted(set(manifest["groups"].values()))[0])
    master, flats, opt = {}, {}, {f: {} for f, v in fields.items() if isinstance(v, dict)}
    for g, layout in engine.layouts.items():
        saved = read(manifest["groups"][g])["groups"][g]

        full = _placed(saved["master"], layout, plan, engine.device, f"{path}: group {g!r} master")
        master[g], flats[g] = engine._buffers(layout, full)
        for f in opt:
            if load_optimizer_states:
                value = _placed(saved["opt"][f], layout, plan, engine.device, f"{path}: group {g!r} {f}")
                opt[f][g] = layout.shard(value, plan.rank).clone() if plan.sharded_master else value
    if load_optimizer_states:
        scalars = {
            f: head["scalars"][f].to(engine.device) for f, v in fields.items() if not isinstance(v, dict)
        }
        opt_state = _rebuild(template, {**scalars, **opt})
    else:
        opt_state = None
    state = engine.state_from(master, flats, opt_state, seed=int(head["seed"]))
    if load_optimizer_states:
        state = state.replace(
            step=head["step"].clone(),
            skipped_steps=head["skipped_steps"].clone(),
            scaler=ScalerState(**{k: v.clone() for k, v in head["scaler"].items()}),
        )
    return engine.bind(state), dict(head.get("client_state") or {}), folder
