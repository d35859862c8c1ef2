"""``save_checkpoint`` / ``load_checkpoint`` with DeepSpeed's signatures, in zerostep's format.

The checkpoint is the functional engine's (msgpack shards, reshardable at load to any world size and
stage); the facade adds its counters (``global_samples``, ``micro_steps``, the param groups'
hyperparameters, the LR scheduler's ``state_dict``) and the script's ``client_state`` under two keys of
the checkpoint's client state. ``load_checkpoint`` returns ``(path, client_state)``, or ``(None, None)``
when ``load_dir`` holds no ``latest`` and no tag was given, as DeepSpeed does.

Frozen parameters (``requires_grad=False``: outside the engine's state, the model's own tensors) are
written beside the client state unless ``exclude_frozen_parameters``, and copied back into the model at
load, as DeepSpeed keeps them in its module state dict. ``save_latest=False`` commits the checkpoint
without pointing ``latest`` at it.

Differences from DeepSpeed, each warned about when it matters: ``load_module_strict=False`` cannot
load a checkpoint of another model (the parameter layouts must match; zerostep refuses with the
differences listed); ``load_module_only`` (and ``load_optimizer_states=False``) load the weights and
start the optimizer and the step counters afresh, DeepSpeed's warm start.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from zerostep.core.deepspeed_checkpoint import load_deepspeed_checkpoint
from zerostep.io import CheckpointError
from zerostep.io.deepspeed_format import is_deepspeed_checkpoint, read_deepspeed_checkpoint

ENGINE_STATE_KEY = "deepspeed_engine"
CLIENT_STATE_KEY = "deepspeed_client_state"
FROZEN_KEY = "deepspeed_frozen_parameters"
SAMPLER_KEY = "deepspeed_data_sampler"  # the curriculum's DeepSpeedDataSampler (DeepSpeed's data_sampler)


def _agree_on_tag(engine: Any, tag: str) -> None:
    """``checkpoint.tag_validation``: every rank must save under the same tag (Warn / Ignore / Fail)."""
    mode = engine._core.config.checkpoint.tag_validation
    if mode == "Ignore" or engine.dp_world_size == 1:
        return
    tags: list[Any] = [None] * engine.dp_world_size
    dist.all_gather_object(tags, tag, group=engine._core.group)
    if len(set(tags)) > 1:
        message = f"checkpoint tags differ across ranks: {tags}"
        if mode == "Fail":
            raise ValueError(message + " (checkpoint.tag_validation is Fail)")
        warnings.warn(message, stacklevel=4)


def save_checkpoint(
    engine: Any,
    save_dir: str | os.PathLike,
    tag: str | None,
    client_state: dict,
    save_latest: bool,
    exclude_frozen_parameters: bool,
) -> bool:
    if tag is None:
        tag = f"global_step{engine.global_steps}"
    tag = str(tag)
    _agree_on_tag(engine, tag)
    if engine._stepper.pending_backwards:
        raise RuntimeError(
            "save_checkpoint inside a gradient accumulation window (backward ran since the last update); "
            "save after engine.step() at the boundary"
        )
    packed = {CLIENT_STATE_KEY: client_state, ENGINE_STATE_KEY: engine._counters()}
    sampler = engine.curriculum_data_sampler()
    if sampler is not None:
        packed[SAMPLER_KEY] = sampler.state_dict()
    if not exclude_frozen_parameters:
        frozen = _frozen_parameters(engine.module)
        if frozen:
            packed[FROZEN_KEY] = frozen  # replicated: rank 0's copy is written
    engine._core.save(engine._stepper.state, save_dir, tag, client_state=packed, update_latest=save_latest)
    return True


def _frozen_parameters(module: Any) -> dict[str, Any]:
    """name -> each frozen parameter on the CPU (the model's own tensor, not in the engine's state; the
    save writes or snapshots it, so no copy here)."""
    return {n: p.detach().cpu() for n, p in module.named_parameters() if not p.requires_grad}


def _restore_frozen(engine: Any, saved: dict[str, Any], where: str) -> None:
    """Copy the checkpoint's frozen parameters into the model's; one the model does not have frozen, or of
    another shape, is a CheckpointError naming it (nothing is copied then)."""
    here = {n: p for n, p in engine.module.named_parameters() if not p.requires_grad}
    kept = " (the trained state was loaded, no frozen parameter was)"
    for name, value in saved.items():
        target = here.get(name)
        if target is None:
            raise CheckpointError(
                where, f"frozen parameter {name!r} of the checkpoint is not frozen here{kept}"
            )
        if tuple(target.shape) != tuple(value.shape):
            raise CheckpointError(
                where,
                f"frozen parameter {name!r} has shape {tuple(value.shape)} in the checkpoint, "
                f"{tuple(target.shape)} in this model{kept}",
            )
    with torch.no_grad():
        for name, value in saved.items():
            here[name].copy_(value)


def load_checkpoint(
    engine: Any,
    load_dir: str | os.PathLike,
    tag: str | None,
    load_module_strict: bool,
    load_optimizer_states: bool,
    load_lr_scheduler_states: bool,
    load_module_only: bool,
    custom_load_fn: Any,
) -> tuple[str | None, dict | None]:
    if custom_load_fn is not None:
        raise NotImplementedError("load_checkpoint(custom_load_fn=...) is not supported by zerostep")
    if tag is None and not os.path.isfile(os.path.join(os.fspath(load_dir), "latest")):
        warnings.warn(
            f"Unable to find latest file at {os.path.join(os.fspath(load_dir), 'latest')}; pass an explicit "
            "tag to load a checkpoint (nothing loaded)",
            stacklevel=3,
        )
        return None, None
    if not load_module_strict:
        _warn_once(
            engine,
            "strict",
            "load_checkpoint(load_module_strict=False): zerostep loads only checkpoints whose parameters "
            "match the model's; a mismatch is an error listing the differences",
        )
    with_optimizer = load_optimizer_states and not load_module_only
    stepper = engine._stepper
    stepper.discard()
    if is_deepspeed_checkpoint(load_dir, tag):
        return _load_deepspeed(engine, load_dir, tag, with_optimizer, load_lr_scheduler_states)
    state, packed = engine._core.load(
        load_dir,
        tag,
        load_optimizer_states=with_optimizer,
        return_client_state=True,
        into=stepper.state,
    )
    stepper.replace_state(state)
    packed = packed or {}
    resolved = tag if tag is not None else _read_latest(load_dir)
    if packed.get(FROZEN_KEY):
        _restore_frozen(engine, packed[FROZEN_KEY], os.path.join(os.fspath(load_dir), resolved))
    counters = packed.get(ENGINE_STATE_KEY) or {}
    sampler = engine.curriculum_data_sampler()
    if sampler is not None and not load_module_only and packed.get(SAMPLER_KEY) is not None:
        sampler.load_state_dict(packed[SAMPLER_KEY])
    if with_optimizer and counters:
        engine.global_samples = int(counters.get("global_samples", 0))
        engine.micro_steps = int(counters.get("micro_steps", 0))
        saved_groups = counters.get("optimizer")
        if saved_groups and len(saved_groups) == len(engine.optimizer.param_groups):
            engine.optimizer.load_state_dict({"param_groups": saved_groups})
    if load_lr_scheduler_states and not load_module_only and engine.lr_scheduler is not None:
        saved = counters.get("lr_scheduler")
        if saved is not None:
            engine.lr_scheduler.load_state_dict(saved)
    return os.path.join(os.fspath(load_dir), resolved), packed.get(CLIENT_STATE_KEY, {})


def _read_latest(load_dir: str | os.PathLike) -> str:
    with open(os.path.join(os.fspath(load_dir), "latest"), encoding="utf-8") as f:
        return f.read().strip()


def _warn_once(engine: Any, key: str, message: str) -> None:
    seen = engine.__dict__.setdefault("_warned", set())
    if key not in seen:
        seen.add(key)
        warnings.warn(message, stacklevel=4)


def _load_deepspeed(
    engine: Any, load_dir: str | os.PathLike, tag: str | None, with_optimizer: bool, with_scheduler: bool
) -> tuple[str, dict]:
    """A checkpoint DeepSpeed wrote (``mp_rank_*`` / ``zero_pp_rank_*`` files): migrated at this engine's
    world size and stage (core/deepspeed_checkpoint.py), so a run moves from DeepSpeed mid-training."""
    checkpoint = read_deepspeed_checkpoint(load_dir, tag)
    state, client = load_deepspeed_checkpoint(
        engine._core, load_dir, tag, load_optimizer_states=with_optimizer, checkpoint=checkpoint
    )
    engine._stepper.replace_state(state)
    if with_optimizer:
        engine.global_samples = int(checkpoint.global_samples or 0)
        engine.micro_steps = int(checkpoint.global_steps) * engine.gradient_accumulation_steps()
    if with_scheduler and engine.lr_scheduler is not None and checkpoint.lr_scheduler:
        engine.lr_scheduler.load_state_dict(checkpoint.lr_scheduler)
    return checkpoint.path, client
