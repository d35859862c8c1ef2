"""Migrating a run from DeepSpeed: a checkpoint written by DeepSpeed's ``save_checkpoint`` becomes a
``TrainState`` of a zerostep ``Engine``, at the engine's own world size and ZeRO stage.

``zerostep.io.deepspeed_format`` consolidates the DeepSpeed files to full fp32 tensors by name (every rank
reads them); here each rank packs them into the engine's flat layouts and keeps its shard. The Adam
moments fill the state ``engine.optimizer.init`` builds, so the result is the state zerostep would have
had after the same steps; DeepSpeed's ``global_steps`` / ``skipped_steps`` become ``step`` /
``skipped_steps`` (the LR schedule is a function of them, so no scheduler state is needed).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from zerostep.core.state import TrainState
from zerostep.io.deepspeed_format import DeepSpeedCheckpoint, read_deepspeed_checkpoint
from zerostep.io.errors import CheckpointError
from zerostep.optim.adam import AdamState

ADAM_OPTIMIZERS = ("adam", "adamw")


def load_deepspeed_checkpoint(
    engine: Any,
    load_dir: str | os.PathLike,
    tag: str | None = None,
    load_optimizer_states: bool = True,
    *,
    seed: int = 0,
    checkpoint: DeepSpeedCheckpoint | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """``(state, client_state)`` from the DeepSpeed checkpoint ``<load_dir>/<tag>`` (tag from ``latest``).

    Every rank calls it; the module is bound to the new state. ``load_optimizer_states=False`` keeps a
    fresh optimizer state (fine-tuning). Raises ``CheckpointError`` when the checkpoint's parameter names
    or shapes differ from the engine's, when Adam moments are asked for but the engine's optimizer is not
    Adam/AdamW or the checkpoint holds none, or for any damaged file. ``checkpoint``: the result of
    ``read_deepspeed_checkpoint(load_dir, tag)`` when the caller has read it already (its counters)."""
    if checkpoint is None:
        checkpoint = read_deepspeed_checkpoint(load_dir, tag)
    if checkpoint.stage == 0:
        # stage 0 does not say which module entries are frozen: those the model holds frozen are frozen
        for name in [n for n in checkpoint.params if n in engine._constants]:
            checkpoint.frozen_params[name] = checkpoint.params.pop(name)
        _assign_stage_0_moments(engine, checkpoint)
    _check_params(engine, checkpoint)
    if load_optimizer_states:
        _check_optimizer(engine, checkpoint)
    frozen = _frozen_updates(engine, checkpoint)
    experts = getattr(engine, "expert_units", None)
    if experts:  # DeepSpeed's global expert names -> this rank's experts (core/expert_units.py)
        layouts = engine.plan.layouts
        checkpoint.params = experts.local_values(layouts, checkpoint.params)
        if checkpoint.exp_avg is not None and checkpoint.exp_avg_sq is not None:
            checkpoint.exp_avg = experts.local_values(layouts, checkpoint.exp_avg)
            checkpoint.exp_avg_sq = experts.local_values(layouts, checkpoint.exp_avg_sq)
    master, flats = engine.buffers_from(checkpoint.params)
    opt_state = engine.init_optimizer_state(master)
    if load_optimizer_states:
        opt_state = _fill_adam(engine, checkpoint, opt_state)
    state = engine.state_from(master, flats, opt_state, seed=seed)
    state = state.replace(
        step=torch.tensor(checkpoint.global_steps, dtype=torch.int64),
        skipped_steps=torch.tensor(checkpoint.skipped_steps, dtype=torch.int64),
    )
    for name, value in frozen.items():  # frozen parameters and buffers are constants of the forward
        engine._constants[name].copy_(value)
    engine.bind_module(state)
    return state, dict(checkpoint.client_state)


def _assign_stage_0_moments(engine: Any, checkpoint: DeepSpeedCheckpoint) -> None:
    """Stage 0 names no parameter in its optimizer state; with one param group DeepSpeed's optimizer runs
    over the trainable parameters in module order, which the engine knows (the file alone does not when
    the module also holds frozen ones)."""
    by_index = checkpoint.stage0_moments_by_index
    if checkpoint.exp_avg is not None or by_index is None:
        return
    names = [n for n, p in engine.model.named_parameters() if p.requires_grad]
    shapes_agree = len(names) == len(by_index) and all(
        tuple(a.shape) == tuple(checkpoint.params[n].shape) if n in checkpoint.params else False
        for n, (a, _) in zip(names, by_index)
    )
    if not shapes_agree:
        return  # the note already says why the moments are missing
    checkpoint.exp_avg = {n: a for n, (a, _) in zip(names, by_index)}
    checkpoint.exp_avg_sq = {n: b for n, (_, b) in zip(names, by_index)}
    checkpoint.moments_note = None


def _check_params(engine: Any, checkpoint: DeepSpeedCheckpoint) -> None:
    layouts = engine.plan.layouts
    experts = getattr(engine, "expert_units", None)
    if experts:  # every expert under its global name, as DeepSpeed's expert files hold them
        layouts = experts.global_layouts(layouts)
    want = {e.name: e.shape for layout in layouts.values() for e in layout.entries}
    have = {n: tuple(t.shape) for n, t in checkpoint.params.items()}
    problems = []
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    shapes = [f"{n}: checkpoint {have[n]}, model {want[n]}" for n in want if n in have and have[n] != want[n]]
    if missing:
        problems.append(f"missing from the checkpoint: {_first(missing)}")
    if extra:
        problems.append(f"not trainable parameters of the model: {_first(extra)}")
    if shapes:
        problems.append(f"shapes differ: {_first(shapes)}")
    if problems:
        raise CheckpointError(
            checkpoint.path, "DeepSpeed checkpoint does not match the model; " + "; ".join(problems)
        )


def _check_optimizer(engine: Any, checkpoint: DeepSpeedCheckpoint) -> None:
    name = engine.optimizer.name
    if name not in ADAM_OPTIMIZERS:
        raise CheckpointError(
            checkpoint.path,
            f"cannot load DeepSpeed's Adam optimizer state into a '{name}' optimizer; use an Adam/AdamW "
            "optimizer block or load_optimizer_states=False",
        )
    if checkpoint.exp_avg is None or checkpoint.exp_avg_sq is None:
        why = f": {checkpoint.moments_note}" if checkpoint.moments_note else ""
        raise CheckpointError(
            checkpoint.path,
            f"the checkpoint's optimizer state ({checkpoint.optimizer_type or 'client optimizer'}) holds no "
            f"Adam moments (exp_avg / exp_avg_sq){why}"
            "; pass load_optimizer_states=False",
        )


def _frozen_updates(engine: Any, checkpoint: DeepSpeedCheckpoint) -> dict[str, torch.Tensor]:
    """The saved frozen parameters and buffers, which the engine holds as constants of the forward,
    checked before anything is written."""
    out = {}
    saved = [("frozen parameter", checkpoint.frozen_params), ("buffer", checkpoint.buffers)]
    for kind, values in saved:
        for name, value in values.items():
            out[name] = _constant_update(engine, checkpoint, kind, name, value)
    return out


def _constant_update(
    engine: Any, checkpoint: DeepSpeedCheckpoint, kind: str, name: str, value: torch.Tensor
) -> torch.Tensor:
    constant = engine._constants.get(name)
    if constant is None:
        raise CheckpointError(checkpoint.path, f"{kind} {name} of the checkpoint is not one of the model")
    if tuple(constant.shape) != tuple(value.shape):
        raise CheckpointError(
            checkpoint.path, f"{kind} {name}: checkpoint {tuple(value.shape)}, model {tuple(constant.shape)}"
        )
    return value.to(constant.device, constant.dtype)


def _fill_adam(engine: Any, checkpoint: DeepSpeedCheckpoint, opt_state: Any) -> AdamState:
    if not isinstance(opt_state, AdamState):
        raise CheckpointError(
            checkpoint.path, f"engine optimizer state is {type(opt_state).__name__}, not AdamState"
        )
    plan = engine.plan
    for key, moments in (("exp_avg", checkpoint.exp_avg), ("exp_avg_sq", checkpoint.exp_avg_sq)):
        target = getattr(opt_state, key)
        for g, layout in plan.layouts.items():
            full = layout.flatten({n: moments[n] for n in layout.names}, dtype=torch.float32).to(
                engine.device
            )
            piece = layout.shard(full, plan.unit_rank(g)) if plan.sharded_master else full
            target[g].copy_(piece)  # [shard_numel] or [padded_numel], like master[g]
    step = checkpoint.optimizer_step
    if step is None:  # no per-parameter step saved: every applied step is an Adam step
        step = checkpoint.global_steps - checkpoint.skipped_steps
    return opt_state._replace(count=torch.full_like(opt_state.count, float(step)))


def _first(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")
