"""0/1 Adam (Lu et al. 2022) as DeepSpeed's ``ZeroOneAdam`` (deepspeed/runtime/fp16/onebit/zoadam.py,
removed after 0.17) runs it: Adam without bias correction whose variance is updated only at
exponentially spaced steps, with a 1-bit compressed gradient in between, and, once the variance is
frozen, local steps whose accumulated update is synchronised 1-bit compressed at intervals that grow.

Step ``k`` (1-based applied steps; zerostep's step ``k`` is DeepSpeed's ``state['step'] == k``, whose
step 1 is a dummy that only allocates buffers: here step 1 is a real full-precision step). Per leaf,
with ``lr`` the step's learning rate and ``d = sqrt(v) + eps``:

- variance phase, ``k <= var_freeze_step + 1`` (DeepSpeed freezes once ``state['step'] >
  var_freeze_step``, after that step):
  - ``full`` (``k % var_interval == 0``; step 1 too): the engine all-reduces ``g``;
    ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
  - ``onebit`` (otherwise): ``m = b1 m + (1 - b1) C(g_local)``, ``C`` the compressed average (error
    feedback ``worker_error`` / ``server_error``);
  - both: ``p -= lr (m / d + wd p)``; after each ``full`` step from step 2 on, ``var_counter += 1``
    and every ``var_update_scaler`` of them ``var_interval *= 2`` (kappa in the paper);
- frozen phase, ``k > var_freeze_step + 1`` (v fixed):
  - ``local``: ``m = b1 m + (1 - b1) g_local``; ``lrs += lr``; ``p -= lr (m / d + wd p)`` and the
    accumulator ``u -= lr (m / d + wd p)``;
  - ``sync`` (``k % local_step_interval == 0``), after the local step: ``p -= u`` (undo the local steps);
    ``u = C(u * d)``; ``m = -u / lrs``; ``p += u / d``; ``u = 0``; ``lrs = 0``; ``first-sync`` is the
    first frozen step (always a sync: the interval starts at 1), with the error buffers restarted first
    (DeepSpeed zeroes them as the variance freezes: they then carry another quantity);
  - after each frozen step ``local_counter += 1`` and every ``local_step_scaler`` of them
    ``local_step_interval = min(local_step_clipper, 2 * local_step_interval)`` (H in the paper).

The schedule is a pure function of ``k`` (``ZeroOneSchedule``), so the engine picks the variant on the
host; the same counters live in the optimizer state as 0-d tensors updated by the step (and saved with
it; a test checks the two agree), and a load checks the saved ones against the loading config's
schedule (they differ when the policy keys changed between runs: a warning, and the config wins).
Differences from DeepSpeed, on purpose:

- a checkpoint load keeps the schedule, the accumulator ``u`` and ``lrs`` (DeepSpeed's restarts its
  counters at interval 1 and drops ``u``, so a resumed run re-runs the full-precision schedule); only
  the error feedback restarts, as for 1-bit Adam. During local steps each rank's parameters differ; a
  checkpoint holds rank 0's, so a resume from the middle of a local interval continues from rank 0's.
- at world size 1, DeepSpeed skips the momentum update of ``onebit`` steps altogether (its update sits
  under ``size > 1``); here the compressed average of one rank is its own gradient and ``m`` is updated.
- ``lrs`` sums the configured schedule's lr; a param group's lr factor multiplies it where it is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from zerostep.errors import ConfigError
from zerostep.optim.base import (
    Optimizer,
    PerLeaf,
    PyTree,
    Scalar,
    StepOptions,
    check_betas,
    compute_view,
    finish_param,
    is_static,
    leaves_like,
    masked_weight_decay,
    per_leaf,
    prepared_grad,
    step_count,
    zeros_like_state,
)
from zerostep.optim.onebit_adam import (
    CompressedAllReduce,
    check_onebit_common,
    init_error_buffers,
    step_leaf_,
)
from zerostep.optim.phase_schedule import with_schedule

FULL, ONEBIT, LOCAL, SYNC, FIRST_SYNC = "full", "onebit", "local", "sync", "first-sync"


class ZeroOneAdamState(NamedTuple):
    count: torch.Tensor  # 0-d fp32: steps taken
    exp_avg: PyTree
    exp_avg_sq: PyTree  # updated on ``full`` steps only
    momentum_accumulator: PyTree  # u: the local steps' summed update since the last sync
    lrs: torch.Tensor  # 0-d: the lrs summed since the last sync
    var_interval: torch.Tensor  # 0-d policy counters, as DeepSpeed's state (ZeroOneSchedule.counters_at)
    var_counter: torch.Tensor
    local_step_interval: torch.Tensor
    local_step_counter: torch.Tensor
    worker_error: PyTree  # per leaf [W, C] ([0, 0] at world size 1)
    server_error: PyTree  # per leaf [1, C]


class ZeroOneSchedule:
    """The host's copy of DeepSpeed's policy: the variant and counters of step ``k``, in O(log k)."""

    def __init__(
        self, var_freeze_step: int, var_update_scaler: int, local_step_scaler: int, local_step_clipper: int
    ) -> None:
        self.last_var_phase_step = var_freeze_step + 1
        self.kappa, self.scaler, self.clipper = var_update_scaler, local_step_scaler, local_step_clipper

    def _var_phase(self, k: int) -> tuple[bool, int, int]:
        """(is a full step, var_interval, var_counter) at the start of step ``k`` of the variance phase."""
        if k == 1:
            return True, 1, 0
        done, interval = 1, 1  # steps up to ``done`` are behind; counting starts at step 2
        while True:
            last = (done // interval + self.kappa) * interval  # the kappa-th full step at this interval
            if k <= last:
                return k % interval == 0, interval, (k - 1) // interval - done // interval
            done, interval = last, 2 * interval

    def _local_interval(self, j: int) -> int:
        """The local-step interval of the ``j``-th frozen step (1-based)."""
        doublings = (j - 1) // self.scaler
        return self.clipper if doublings >= self.clipper.bit_length() else min(self.clipper, 2**doublings)

    def __call__(self, k: int) -> str:
        if k <= self.last_var_phase_step:
            return FULL if self._var_phase(k)[0] else ONEBIT
        j = k - self.last_var_phase_step
        if j == 1:
            return FIRST_SYNC
        return SYNC if k % self._local_interval(j) == 0 else LOCAL

    def counters_at(self, k: int) -> tuple[int, int, int, int]:
        """(var_interval, var_counter, local_step_interval, local_step_counter) before step ``k``."""
        if k <= self.last_var_phase_step:
            _, interval, counter = self._var_phase(k)
            return interval, counter, 1, 0
        _, interval, counter = self._var_phase(self.last_var_phase_step + 1)
        j = k - self.last_var_phase_step
        return interval, counter, self._local_interval(j), (j - 1) % self.scaler


def _positive_int(name: str, value: float) -> int:
    if isinstance(value, bool) or not float(value).is_integer() or value < 1:
        raise ConfigError(f"optimizer.params.{name}: {value!r} is invalid; it must be an integer >= 1")
    return int(value)


def zero_one_adam(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    var_freeze_step: int = 100000,
    var_update_scaler: int = 16,
    local_step_scaler: int = 32678,
    local_step_clipper: int = 16,
    bias_correction: bool = True,
    eps_inside_sqrt: bool = False,
    amsgrad: bool = False,
    cuda_aware: bool = False,
    comm_backend_name: str = "nccl",
    world_size: int = 1,
    compressed_allreduce: CompressedAllReduce | None = None,
    weight_decay_mask: PerLeaf = None,
    lr_multipliers: PerLeaf = None,
    padding: PerLeaf = None,
) -> Optimizer:
    """DeepSpeed's ZeroOneAdam (module docstring); the engine-supplied arguments as ``onebit_adam``'s."""
    b1, b2 = check_betas(betas)
    check_onebit_common(
        "zero_one_adam",
        lr=lr,
        eps=eps,
        weight_decay=weight_decay,
        freeze_step=var_freeze_step,
        freeze_name="var_freeze_step",
        comm_backend_name=comm_backend_name,
        amsgrad=amsgrad,
        world_size=world_size,
        compressed_allreduce=compressed_allreduce,
    )
    kappa = _positive_int("var_update_scaler", var_update_scaler)
    scaler = _positive_int("local_step_scaler", local_step_scaler)
    clipper = _positive_int("local_step_clipper", local_step_clipper)
    schedule = ZeroOneSchedule(int(var_freeze_step), kappa, scaler, clipper)
    hyper = dict(
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        weight_decay=weight_decay,
        var_freeze_step=int(var_freeze_step),
        var_update_scaler=kappa,
        local_step_scaler=scaler,
        local_step_clipper=clipper,
        comm_backend_name=comm_backend_name,
        cuda_aware=cuda_aware,
        world_size=world_size,
    )

    def init(params: PyTree) -> ZeroOneAdamState:
        worker, server = init_error_buffers(params, world_size)
        count = step_count(params)
        zero, one = torch.zeros_like(count), torch.ones_like(count)
        return ZeroOneAdamState(
            count,
            zeros_like_state(params),
            zeros_like_state(params),
            zeros_like_state(params),
            zero.clone(),
            one.clone(),
            zero.clone(),
            one.clone(),
            zero.clone(),
            worker,
            server,
        )

    def averaged(x: torch.Tensor, we: torch.Tensor, se: torch.Tensor, pad: tuple) -> torch.Tensor:
        if compressed_allreduce is None:
            return x
        out = compressed_allreduce(x, we, se)
        for start, stop in pad:  # no parameter there: keep the padding's zeros (DeepSpeed's exp_avg_mask)
            out[start:stop].zero_()
        return out

    def run(variant: str) -> Callable[..., None]:
        frozen = variant in (LOCAL, SYNC, FIRST_SYNC)

        def apply(
            grads: PyTree, state: ZeroOneAdamState, params: PyTree, lr: Scalar, opts: StepOptions
        ) -> None:
            beta1 = b1 if opts.beta1 is None else opts.beta1
            beta2 = b2 if opts.beta2 is None else opts.beta2
            state.count.add_(1)
            if frozen:
                state.lrs.add_(lr)
            p_leaves, (g_leaves, m_leaves, v_leaves, u_leaves, w_leaves, s_leaves) = leaves_like(
                params,
                grads,
                state.exp_avg,
                state.exp_avg_sq,
                state.momentum_accumulator,
                state.worker_error,
                state.server_error,
            )
            leaves = zip(
                p_leaves,
                g_leaves,
                m_leaves,
                v_leaves,
                u_leaves,
                w_leaves,
                s_leaves,
                per_leaf(opts.param_copies, params, None),
                per_leaf(weight_decay_mask, params, True),
                per_leaf(lr_multipliers, params, 1.0),
                per_leaf(padding, params, ()),
            )
            for p, g, m, v, u, we, se, copy, mask, mult, pad in leaves:
                g = prepared_grad(g, opts.grad_scale, m.dtype)
                leaf_lr = lr if is_static(mult, 1) else lr * mult
                wd = masked_weight_decay(weight_decay, mask)
                if variant == FULL:
                    m.mul_(beta1).add_(g * (1 - beta1))
                    v.mul_(beta2).add_(g * g * (1 - beta2))
                elif variant == ONEBIT:
                    m.mul_(beta1).add_(averaged(g, we, se, pad) * (1 - beta1))
                else:
                    m.mul_(beta1).add_(g * (1 - beta1))
                if not frozen:
                    step_leaf_(p, m, v, leaf_lr, eps, wd, copy)
                    continue
                pw = compute_view(p)
                denom = v.sqrt() + eps
                update = m / denom
                if not is_static(wd, 0):
                    update = update + wd * pw
                pw.sub_(update * leaf_lr)
                u.sub_(update * leaf_lr)
                if variant != LOCAL:
                    if variant == FIRST_SYNC:
                        we.zero_()
                        se.zero_()
                    pw.sub_(u)
                    u.copy_(averaged(u * denom, we, se, pad))
                    lrs = state.lrs if is_static(mult, 1) else state.lrs * mult
                    m.copy_(-u / lrs)
                    pw.add_(u / denom)
                    u.zero_()
                finish_param(p, pw, copy)
            if variant in (SYNC, FIRST_SYNC):
                state.lrs.zero_()
            advance_counters(state, variant)

        return apply

    def advance_counters(state: ZeroOneAdamState, variant: str) -> None:
        # DeepSpeed's end-of-step policy updates, on device (ZeroOneSchedule is the host's copy)
        if variant == FULL:
            counter = state.var_counter + (state.count >= 2).float()  # step 1 is DeepSpeed's dummy step
            wrap = counter >= kappa
            state.var_counter.copy_(torch.where(wrap, 0.0, counter))
            state.var_interval.copy_(torch.where(wrap, 2 * state.var_interval, state.var_interval))
        elif variant != ONEBIT:
            counter = state.local_step_counter + 1
            wrap = counter >= scaler
            doubled = torch.clamp(2 * state.local_step_interval, max=float(clipper))
            state.local_step_counter.copy_(torch.where(wrap, 0.0, counter))
            state.local_step_interval.copy_(torch.where(wrap, doubled, state.local_step_interval))

    def after_load(state: ZeroOneAdamState) -> ZeroOneAdamState:
        """The saved policy counters against this config's schedule at the saved step: they differ when
        the policy keys changed between runs; the schedule (this config) wins, with a warning."""
        counters = (
            state.var_interval,
            state.var_counter,
            state.local_step_interval,
            state.local_step_counter,
        )
        saved = tuple(int(t) for t in counters)
        want = schedule.counters_at(int(state.count) + 1)
        if saved != want:
            warnings.warn(
                f"ZeroOneAdam: the checkpoint's policy counters (var_interval, var_counter, "
                f"local_step_interval, local_step_counter) = {saved} differ from this config's schedule at "
                f"step {int(state.count) + 1}, {want} (var_freeze_step / var_update_scaler / local_step_* "
                "changed?): continuing with this config's schedule",
                stacklevel=2,
            )
            for tensor, value in zip(counters, want):
                tensor.fill_(value)
        return state

    apply = with_schedule(
        {name: run(name) for name in (FULL, ONEBIT, LOCAL, SYNC, FIRST_SYNC)},
        FULL,
        {FULL: 0, ONEBIT: 1, LOCAL: 0, SYNC: 1, FIRST_SYNC: 1},
        schedule,
        after_load,
    )
    return Optimizer(name="zerooneadam", lr=float(lr), hyperparams=hyper, init_fn=init, apply_fn=apply)
