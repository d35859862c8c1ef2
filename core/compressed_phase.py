"""The engine's side of the compressed-communication optimizers (1-bit Adam, 0/1 Adam, 1-bit LAMB;
optim/onebit_adam.py, optim/zero_one_adam.py, optim/onebit_lamb.py, optim/phase_schedule.py).

Where DeepSpeed stops all-reducing gradients (its engine's ``enable_backward_allreduce = False``) the
optimizer communicates itself, compressed. Here the engine holds every variant of phases 3 and 4 the
optimizer's schedule names, built once (one compiled step: the all-reduced variant; the others eager),
and a ``PhaseSwitch`` picks one per step on the host from the state's applied-step count:

- the reduced variant (1-bit Adam's and 1-bit LAMB's warm-up, 0/1 Adam's variance steps): the stage-0
  reducer and update, with the optimizer's ``apply_fn``;
- each local variant: an accumulate-only reducer (this rank's local gradient) and ``make_local_update``, whose
  graph A all-reduces the finite flag / loss / local squared norms (so every rank skips an fp16
  overflow together: the compressed exchange must run on all ranks or none) and whose graph B runs the
  optimizer's variant, eagerly: its collectives (all-to-all, all-gather of uint8 signs) are
  eager process-group calls.

Gradient clipping in the compressed phase clips by the root mean square over ranks of the local
gradient norms (there is no global gradient there); the reported ``grad_norm`` is that value too.
Under tensor parallelism each replica's local norm is completed over the tensor-parallel group as the
global norm is (``core/model_parallel.ReplicaNorm``: split parameters on every rank, replicated ones
once), while the compressed exchange itself stays over the data-parallel group.
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
from zerostep.optim.phase_schedule import PhaseSchedule, phase_schedule, with_variant
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


def parameter_ranges(layout: Any) -> tuple[tuple[int, int], ...]:
    """The ``[start, stop)`` range of each parameter of a layout's buffer (1-bit LAMB's tensors)."""
    return tuple((e.offset, e.offset + e.numel) for e in layout.entries)


def compressed_allreduce_over(group: Any) -> Callable[..., torch.Tensor]:
    """The optimizer's injected collective: ``(m, worker_error, server_error) -> average``."""
    return lambda m, worker, server: compressed_allreduce(m, worker, server, group)


class PhaseSwitch:
    """Which update variant the next step runs (optim/phase_schedule.py), from the state's applied-step
    count on the host; ``compressed``: a variant fed local gradients (no gradient all-reduce)."""

    def __init__(self, schedule: PhaseSchedule) -> None:
        self.schedule = schedule
        self.variant = schedule.reduced
        self.compressed = False

    def set_from(self, state: Any) -> None:
        applied = int(state.step) - int(state.skipped_steps)
        self.variant = self.schedule.variant_at(applied + 1)
        self.compressed = self.variant != self.schedule.reduced


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
    mp = plan.model_parallel  # tensor parallelism: the norm's share over whole local buffers
    whole = None if mp is None else (mp.whole or mp)

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
        for g, grad in grads.items():
            if whole is not None:
                sumsq = sumsq + whole.sumsq(g, grad)
                continue
            for part in grad if isinstance(grad, list) else [grad]:
                sumsq = sumsq + part.float().pow(2).sum()
        parts = [sumsq, loss_sum.float() / plan.accumulation_steps]
        if failed is not None:
            flag = torch.tensor(float(failed), device=loss_sum.device)
            parts += [flag, flag * (plan.rank if mp is None else mp.world_rank)]
        packed = torch.stack(parts)
        if world > 1:
            packed = collectives.all_reduce_flat(packed, group, None)
        if mp is not None:
            packed = mp.complete(packed)
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
    """What the engine keeps for a compressed optimizer: the switch and the local variants' pieces."""

    switch: PhaseSwitch
    reducer: SwitchingReducer
    comm_by_variant: dict[str, CommPlan]  # each local variant's collectives of an applied step

    @property
    def comm_applied(self) -> CommPlan:
        """The collectives of an applied step of the current (local) variant."""
        return self.comm_by_variant[self.switch.variant]

    def wrap_update(
        self, warm: Callable[..., UpdateResult], local: dict[str, Callable[..., UpdateResult]]
    ) -> Callable:
        switch = self.switch

        def sharded_update(*args: Any, **kwargs: Any) -> UpdateResult:
            return (local[switch.variant] if switch.compressed else warm)(*args, **kwargs)

        return sharded_update


def build_compressed_phases(
    plan: StepPlan, optimizer: Optimizer, warm_reducer: Reducer, group: Any
) -> CompressedPhases | None:
    """The switch and compressed-phase reducer for ``optimizer`` (None for an ordinary optimizer)."""
    schedule = phase_schedule(optimizer)
    if schedule is None:
        return None
    switch = PhaseSwitch(schedule)
    reducer = SwitchingReducer(switch, warm_reducer, Reducer(plan.accumulation_dtype))
    comm = {}
    for name in schedule.local:
        plan_of = collectives.all_reduce_plan(2, torch.float32, plan.world_size)  # graph A's [sumsq, loss]
        for _ in range(schedule.compressed_calls[name]):
            for lay in plan.layouts.values():
                plan_of = plan_of + compressed_allreduce_plan(lay.padded_numel, plan.world_size)
        comm[name] = plan_of
    return CompressedPhases(switch, reducer, comm)


def local_update_for(
    plan: StepPlan, optimizer: Optimizer, group: Any
) -> dict[str, Callable[..., UpdateResult]]:
    """Phase 4 of each local variant of the optimizer's schedule, by name."""
    schedule = phase_schedule(optimizer)
    assert schedule is not None
    return {name: make_local_update(plan, with_variant(optimizer, name), group) for name in schedule.local}
