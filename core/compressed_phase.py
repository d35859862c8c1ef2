"""The engine's side of the compressed-communication optimizers (1-bit Adam; optim/onebit_adam.py).

After ``freeze_step`` applied steps DeepSpeed stops all-reducing gradients (its engine's
``enable_backward_allreduce = False``) and the optimizer averages its momentum itself, compressed. Here
the engine holds both variants of phases 3 and 4, built once (at most two compiled step variants),
and a ``PhaseSwitch`` picks one per step on the host from the state's applied-step count:

- warm-up: the stage-0 reducer and update, with the optimizer's warm-up (``apply_fn``);
- compressed: an accumulate-only reducer (this rank's local gradient) and ``make_local_update``, whose
  graph A all-reduces the finite flag / loss / local squared norms (so every rank skips an fp16
  overflow together: the compressed exchange must run on all ranks or none) and whose graph B runs the
  optimizer's compressed phase, eagerly: its collectives (all-to-all, all-gather of uint8 signs) are
  eager process-group calls.

Gradient clipping in the compressed phase clips by the root mean square over ranks of the local
gradient norms (there is no global gradient there); the reported ``grad_norm`` is that value too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from zerostep.core.reducers import Reducer
from zerostep.core.step import StepPlan, UpdateResult, make_apply_update
from zerostep.core.step_failure import RemoteStepError, describe_remote_failure
from zerostep.errors import ConfigError
from zerostep.optim.base import Optimizer
from zerostep.optim.onebit_adam import compressed_phase, freeze_step_of
from zerostep.parallel import collectives
from zerostep.parallel.collectives import CommPlan
from zerostep.parallel.compressed import compressed_allreduce, compressed_allreduce_plan

# DeepSpeed's comm_backend_name -> the torch.distributed backend it stands for
_BACKEND_OF = {"nccl": "nccl", "mpi": "mpi", "hccl": "hccl", "compressed": None}


def check_compressed_optimizer(
    optimizer_type: str, stage: int, backend: str | None, comm_backend: str
) -> str:
    """ConfigError unless ZeRO stage 0 (as DeepSpeed asserts); a warning text when the config's
    ``comm_backend_name`` differs from the process group's backend (zerostep uses the group), else ''."""
    if stage != 0:
        raise ConfigError(
            f"optimizer.type {optimizer_type!r} needs zero_optimization.stage 0 (DeepSpeed: "
            f"'not compatible with ZeRO'); this config has stage {stage}"
        )
    wanted = _BACKEND_OF.get(comm_backend)
    if backend is not None and wanted is not None and wanted != backend:
        return (
            f"optimizer.params.comm_backend_name = {comm_backend!r}: zerostep runs the compressed "
            f"exchange over the engine's process group, whose backend is {backend!r}"
        )
    return ""


def padding_ranges(layout: Any) -> tuple[tuple[int, int], ...]:
    """The ``[start, stop)`` ranges of a layout's buffer that no parameter covers (gaps and the tail)."""
    out, at = [], 0
    for e in layout.entries:
        if e.offset > at:
            out.append((at, e.offset))
        at = max(at, e.offset + e.numel)
    if at < layout.padded_numel:
        out.append((at, layout.padded_numel))
    return tuple(out)


def compressed_allreduce_over(group: Any) -> Callable[..., torch.Tensor]:
    """The optimizer's injected collective: ``(m, worker_error, server_error) -> average``."""
    return lambda m, worker, server: compressed_allreduce(m, worker, server, group)


class PhaseSwitch:
    """Which phase the next step runs: compressed once ``freeze_step`` steps were applied."""

    def __init__(self, freeze_step: int) -> None:
        self.freeze_step = freeze_step
        self.compressed = False

    def set_from(self, state: Any) -> None:
        applied = int(state.step) - int(state.skipped_steps)
        self.compressed = applied >= self.freeze_step


class SwitchingReducer(Reducer):
    """Phase 3 by the switch: the stage-0 reducer (warm-up) or local accumulation (compressed)."""

    def __init__(self, switch: PhaseSwitch, warm: Reducer, local: Reducer) -> None:
        super().__init__(warm.accum_dtype)
        self.switch, self.warm, self.local = switch, warm, local

    @property
    def current(self) -> Reducer:
        return self.local if self.switch.compressed else self.warm

    @property
    def grad_sink(self) -> Any:  # type: ignore[override]
        return self.current.grad_sink

    def reset(self) -> None:
        self.warm.reset()
        self.local.reset()

    def grad_hooks(self, last: bool) -> dict[str, Callable] | None:
        return self.current.grad_hooks(last)

    def add(self, grads: Any, last: bool) -> None:
        self.current.add(grads, last)

    def result(self) -> Any:
        return self.current.result()


def make_local_update(plan: StepPlan, optimizer: Optimizer, group: Any) -> Callable[..., UpdateResult]:
    """Phase 4 of the compressed phase, ``sharded_update``'s signature (core/step.py) over local
    gradients (the sum over micro-batches of d(loss * scale / GAS) on this rank)."""
    # a one-rank plan: unscale is 1 / scale (no all-reduce summed the ranks), no collective in graph B
    local = dataclasses.replace(plan, world_size=1, rank=0)
    apply_update = make_apply_update(local, optimizer, group, compile=False)
    world = plan.world_size

    def local_update(
        grads: dict[str, Any],
        loss_sum: torch.Tensor,
        *,
        scale: torch.Tensor,
        master: dict[str, torch.Tensor],
        opt_state: Any,
        params: dict[str, torch.Tensor],
        lr: torch.Tensor,
        beta1: torch.Tensor | None,
        failed: bool | None = None,
        before_write: Callable[[bool], None] | None = None,
    ) -> UpdateResult:
        sumsq = torch.zeros((), dtype=torch.float32, device=loss_sum.device)
        for grad in grads.values():
            for part in grad if isinstance(grad, list) else [grad]:
                sumsq = sumsq + part.float().pow(2).sum()
        parts = [sumsq, loss_sum.float() / plan.accumulation_steps]
        if failed is not None:
            flag = torch.tensor(float(failed), device=loss_sum.device)
            parts += [flag, flag * plan.rank]
        packed = torch.stack(parts)
        if world > 1:
            packed = collectives.all_reduce_flat(packed, group, None)
        mean_sumsq, loss = packed[0] / world, packed[1] / world
        finite, *failures = torch.cat([torch.isfinite(packed[:1]).float(), packed[2:]]).tolist()
        if failures and failures[0]:
            raise RemoteStepError(describe_remote_failure(int(failures[0]), int(failures[1])))
        applied = bool(finite)
        if before_write is not None:
            before_write(applied)
        if applied:
            apply_update(grads, master, opt_state, params, mean_sumsq, scale, lr, beta1, None)
        return UpdateResult(applied, loss, torch.sqrt(mean_sumsq) / scale, None)

    return local_update


@dataclasses.dataclass
class CompressedPhases:
    """What the engine keeps for a compressed optimizer: the switch and the compressed phase's pieces."""

    switch: PhaseSwitch
    reducer: SwitchingReducer
    comm_applied: CommPlan  # the compressed phase's collectives of an applied step

    def wrap_update(self, warm: Callable[..., UpdateResult], local: Callable[..., UpdateResult]) -> Callable:
        switch = self.switch

        def sharded_update(*args: Any, **kwargs: Any) -> UpdateResult:
            return (local if switch.compressed else warm)(*args, **kwargs)

        return sharded_update


def build_compressed_phases(
    plan: StepPlan, optimizer: Optimizer, warm_reducer: Reducer, group: Any
) -> CompressedPhases | None:
    """The switch and compressed-phase reducer for ``optimizer`` (None for an ordinary optimizer)."""
    freeze_step = freeze_step_of(optimizer)
    if freeze_step is None:
        return None
    switch = PhaseSwitch(freeze_step)
    reducer = SwitchingReducer(switch, warm_reducer, Reducer(plan.accumulation_dtype))
    comm = collectives.all_reduce_plan(2, torch.float32, plan.world_size)  # graph A's [sumsq, loss]
    for lay in plan.layouts.values():
        comm = comm + compressed_allreduce_plan(lay.padded_numel, plan.world_size)
    return CompressedPhases(switch, reducer, comm)


def local_update_for(plan: StepPlan, optimizer: Optimizer, group: Any) -> Callable[..., UpdateResult]:
    phase = compressed_phase(optimizer)
    assert phase is not None
    return make_local_update(plan, phase, group)
