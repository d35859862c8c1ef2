"""The whole step as one compiled region, for the configs where that pays (one process).

``core/step.py`` runs a step as three compiled graphs and one host read: forward+backward, graph A
(norm, finite check, loss) and graph B (clip and update), with the finite flag read on the host between
A and B so that a skipped step never touches a buffer. Each compiled call costs a fixed host overhead
(dynamo's guards, AOTAutograd's runtime wrappers: 50-150 us on this CPU, measured in
``benchmarks/train_step.py``), and the flag read waits for the device. On a small model that fixed cost
is the step: a 2 x Linear(32, 32) model stepped at 1.6-1.9x an eager ``torch.optim.AdamW(fused=True)``
loop.

Here forward, backward (``torch.func.grad`` traced into the graph, so there is no AOTAutograd
backward and no autograd engine call), the norm, the finite check, clipping and the optimizer update
are one ``torch.compile`` graph. A skipped step is decided on the device: the update writes
``torch.where(finite, new, old)`` into every buffer, which inductor fuses into the update's own pass
(measured: no slower than the unmasked update). The host learns whether the step was applied only
when it asks (``state.metrics.skipped``, ``state.skipped_steps``): the engine itself reads it at the next
step only when the learning-rate schedule depends on the count of applied steps (a ``scheduler`` block,
or OneCycle's momentum).

Every buffer write depends on the squared norm, which depends on every gradient, so a failure in the
user's forward or backward (the graph's only user code) raises before any write: a step that raises
leaves the state valid, as in the split step.

Which configs qualify (``reason_not_to_fuse`` says why one does not): one process (no collective to
place), compiled, ZeRO stage 0-2 (stage 3 runs through its eager gather runner), no dynamic fp16 loss
scaling (its ``min_loss_scale`` error must be raised before the update writes), no optimizer offload,
no 1-bit phases, no sparse gradients, no wall-clock breakdown (it times the phases), no training
schedules or random-LTD (they change the forward between steps), no per-unit activation checkpointing,
and at most ``MAX_FUSED_MICRO_BATCHES`` micro-batches (they are unrolled into the graph). A first call
that fails to compile falls back to the split step for good, with a warning.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from zerostep.core.compiling import compile_private
from zerostep.core.precision import ScalerState, is_dynamic
from zerostep.core.state import Metrics, TrainState, mark_consumed
from zerostep.core.step import Flats, StepPlan, step_seed
from zerostep.optim import ONE_CYCLE_BETA2

# micro-batches are unrolled into the one graph: its size and compile time grow with their count
MAX_FUSED_MICRO_BATCHES = 4


class RegionResult(NamedTuple):
    """Device tensors; nothing here has been read on the host."""

    loss: torch.Tensor  # fp32 [], mean over micro-batches
    grad_norm: torch.Tensor  # fp32 [], unscaled, before clipping; inf/nan when skipped
    finite: torch.Tensor  # bool []: False when the update was skipped (every buffer left as it was)


def reason_not_to_fuse(engine: Any) -> str | None:
    """None when ``engine``'s step can run as one region; else why not, in a few words."""
    plan: StepPlan = engine.plan
    checks = [
        (not engine.compile_forward, "the forward is not compiled"),
        (plan.world_size > 1 or not engine.mesh.is_world or engine.mesh.world_size > 1, "several ranks"),
        (plan.stage == 3, "ZeRO stage 3"),
        (is_dynamic(engine.loss_scaling), "dynamic fp16 loss scaling"),
        (engine._offload is not None, "optimizer offload"),
        (engine._phases is not None, "1-bit compression phases"),
        (engine._sparse is not None, "sparse gradients"),
        (engine.timers is not None, "wall_clock_breakdown"),
        (engine.schedules is not None, "training schedules"),
        (bool(engine.checkpointed_units), "activation_checkpointing.checkpoint_units"),
        (plan.accumulation_steps > MAX_FUSED_MICRO_BATCHES, f"over {MAX_FUSED_MICRO_BATCHES} micro-batches"),
        (plan.sequence_parallel_size > 1, "sequence parallelism"),
    ]
    return next((why for failed, why in checks if failed), None)


def use_split_step(engine: Any) -> Any:
    """Make ``engine`` run the split step (three graphs and a host read) even where one region
    qualifies: for comparisons (``benchmarks/train_step.py``) and tests. Returns ``engine``."""
    engine._one_region, engine._split_only = None, True
    return engine


def use_cuda_graphs(engine: Any) -> Any:
    """Experimental, CUDA only: compile ``engine``'s one region with ``mode="reduce-overhead"``, so the
    whole step replays as one CUDA graph. Every state buffer is updated in place, so they are marked as
    static addresses at the first step (a state from elsewhere, e.g. a load, is marked in turn);
    the batch must keep its shapes. Untested until a GPU runs ``benchmarks/gpu_check.sh``. Returns
    ``engine``."""
    if engine.device.type != "cuda":
        raise ValueError(f"use_cuda_graphs: the engine trains on {engine.device}, CUDA graphs need a GPU")
    if engine._one_region is None:
        why = reason_not_to_fuse(engine) or "it failed to compile"
        raise ValueError(f"use_cuda_graphs: this engine's step is not one region ({why})")
    engine._one_region = OneRegionStep(engine, cuda_graphs=True)
    return engine


def make_one_region(
    plan: StepPlan,
    forward: Callable[[Flats, Any], torch.Tensor],
    optimizer: Any,
    cuda_graphs: bool = False,
) -> Callable[..., RegionResult]:
    """``region(params, master, opt_state, micro_batches, scale, lr, beta1) -> RegionResult``, compiled.

    ``params``: the compute-dtype flats the forward reads; ``master``: the fp32 (or master-dtype) flats
    the optimizer updates. They are the same tensors when ``plan.params_alias_master`` (then ``params``
    is None). Updates ``master``, ``opt_state`` and (when they are separate) ``params`` in place."""
    gas, clip, layouts = plan.accumulation_steps, plan.gradient_clipping, plan.layouts
    accumulate_in = plan.accumulation_dtype

    def region(
        params: Flats | None,
        master: Flats,
        opt_state: Any,
        micro_batches: list[Any],
        scale: torch.Tensor,
        lr: torch.Tensor,
        beta1: torch.Tensor | None,
    ) -> RegionResult:
        inputs = master if params is None else params
        # per-parameter views: backward writes each parameter's gradient once, where a flat input
        # would copy them into its buffer (4x1024 MLP: 0.83-0.92x eager against 0.99-1.01x); the
        # update's concatenation fuses into the optimizer's pass
        leaves = {g: list(layouts[g].split(f)) for g, f in inputs.items()}

        def objective(views: dict[str, list[torch.Tensor]], micro_batch: Any) -> tuple[torch.Tensor, ...]:
            loss = forward(views, micro_batch).float()
            return loss * (scale / gas), loss.detach()

        grads: dict[str, list[torch.Tensor]] = {}
        loss_sum = torch.zeros((), dtype=torch.float32, device=scale.device)
        for micro_batch in micro_batches:
            step_grads, loss = torch.func.grad(objective, has_aux=True)(leaves, micro_batch)
            for g, parts in step_grads.items():
                parts = [d.to(accumulate_in) for d in parts]
                grads[g] = parts if g not in grads else [a + d for a, d in zip(grads[g], parts)]
            loss_sum = loss_sum + loss
        sumsq = torch.zeros((), dtype=torch.float32, device=scale.device)
        for parts in grads.values():
            for d in parts:
                sumsq = sumsq + d.float().pow(2).sum()
        finite = torch.isfinite(sumsq)
        unscale = plan.unscale(scale)
        grad_scale = unscale
        if clip > 0:
            norm = torch.sqrt(sumsq) * unscale
            grad_scale = unscale * torch.clamp(clip / (norm + 1e-6), max=1.0)

        # the update goes into copies; every buffer then takes where(finite, copy, itself), one pass
        new_master = {g: t.clone() for g, t in master.items()}
        new_state = optree.tree_map(_clone, opt_state)
        new_params = None if params is None else {g: t.clone() for g, t in params.items()}
        optimizer.update_(
            {g: layouts[g].concat(parts).float() for g, parts in grads.items()},  # [padded_numel]
            new_state,
            new_master,
            lr,
            grad_scale=grad_scale,
            beta1=beta1,
            beta2=None if beta1 is None else ONE_CYCLE_BETA2,
            param_copies=new_params,
        )
        _write_where(finite, master, new_master)
        _write_where(finite, optree.tree_leaves(opt_state), optree.tree_leaves(new_state))
        if params is not None:
            _write_where(finite, params, new_params)
        return RegionResult(loss_sum / gas, torch.sqrt(sumsq) * unscale, finite)

    mode = "reduce-overhead" if cuda_graphs else None
    return compile_private(region, dynamic=False, fullgraph=True, mode=mode)


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


def _write_where(finite: torch.Tensor, old: Any, new: Any) -> None:
    pairs = zip(old.values(), new.values()) if isinstance(old, dict) else zip(old, new)
    for a, b in pairs:
        if isinstance(a, torch.Tensor):
            a.copy_(torch.where(finite, b, a))


class OneRegionStep:
    """``Engine.step``'s body when the step runs as one region: the schedule's lr, the call, the
    successor state. Built by ``of`` (None when the engine does not qualify)."""

    def __init__(self, engine: Any, cuda_graphs: bool = False) -> None:
        plan = engine.plan
        self.region = make_one_region(plan, engine._forward, engine.optimizer, cuda_graphs)
        self.cuda_graphs = cuda_graphs
        self._static: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()  # marked as static addresses
        self.separate_params = not plan.params_alias_master
        # the lr depends on the count of applied steps only under a schedule: without one the engine
        # never reads the device's skip flag on the host
        self.lr_at, self.constant_lr = engine.lr_at, engine.config.scheduler is None
        self.ran = False  # a first call that fails is a compile failure: the engine falls back
        self._scale: tuple[torch.Tensor, torch.Tensor] | None = None  # (host scale, its device copy)

    @classmethod
    def of(cls, engine: Any) -> OneRegionStep | None:
        return None if reason_not_to_fuse(engine) is not None else cls(engine)

    def step(self, engine: Any, state: TrainState, micro_batches: list[Any]) -> TrainState | None:
        """The successor of ``state``, or None when the region failed to compile on its first call
        (nothing was written; the caller runs the split step and drops this one)."""
        step = int(state.step)  # a host counter, never on the device
        beta1 = None
        if self.constant_lr and engine.lr_at is self.lr_at and engine.beta1_at is None:
            lr_value = self.lr_at(step - 1)  # constant: any index gives it
        else:  # the one host read of a device value: whether the last step was applied
            applied_before = step - int(state.skipped_steps)
            lr_value = engine.lr_at(applied_before - 1)
            if engine.beta1_at is not None:
                beta1 = torch.full((), engine.beta1_at(applied_before - 1), device=engine.device)
        # torch.full launches a fill: no host-to-device copy, so no wait for the device
        lr = torch.full((), lr_value, dtype=torch.float32, device=engine.device)
        scale = self._device_scale(state.scaler.scale, engine.device)
        flats, _ = state.params.take_in_flight()  # one process: nothing is ever in flight
        master = state.master
        params = flats if self.separate_params else None
        if self.cuda_graphs:
            self._mark_static(params, master, state.opt_state)
        with torch.random.fork_rng(devices=engine._rng_devices):
            engine._seed_rng(step_seed(int(state.seed), step, engine.rank))
            try:
                result = self.region(params, master, state.opt_state, micro_batches, scale, lr, beta1)
            except Exception as error:
                if self.ran:
                    raise  # forward or backward raised before any write: ``state`` is still valid
                warnings.warn(
                    f"the one-region compiled step failed on its first call ({type(error).__name__}: "
                    f"{str(error)[:300]}); this engine uses the split step (three graphs) from now on",
                    stacklevel=3,
                )
                return None
        self.ran = True
        skipped = torch.logical_not(result.finite).to(torch.int64)
        metrics = Metrics(
            loss=result.loss,
            grad_norm=result.grad_norm,
            lr=lr,
            loss_scale=state.scaler.scale.clone(),
            skipped=skipped,
        )
        engine.comm.record(engine._comm_applied)  # one process: no collective, nothing counted
        mark_consumed(state)
        return state.replace(
            step=state.step + 1,
            skipped_steps=state.skipped_steps + skipped,
            scaler=_static_scaler_update(state.scaler, skipped),
            metrics=metrics,
        )

    def _mark_static(self, *trees: Any) -> None:
        for t in optree.tree_leaves(trees, none_is_leaf=False):
            if isinstance(t, torch.Tensor) and t not in self._static:
                torch._dynamo.mark_static_address(t)
                self._static.add(t)

    def _device_scale(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        # a static scale never changes: copy it to the device once per scaler tensor
        if self._scale is None or self._scale[0] is not host:
            self._scale = (host, host.to(device))
        return self._scale[1]


def _static_scaler_update(scaler: ScalerState, skipped: torch.Tensor) -> ScalerState:
    """``precision.loss_scale_update`` for a static scale, with the overflow flag left on the device."""
    last = torch.where(skipped.bool(), scaler.iteration, scaler.last_overflow_iter)
    return scaler._replace(iteration=scaler.iteration + 1, last_overflow_iter=last)
