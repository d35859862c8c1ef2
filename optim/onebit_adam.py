"""1-bit Adam (Tang et al. 2021) as DeepSpeed's ``OnebitAdam`` runs it: Adam without bias correction
for ``freeze_step`` steps on the all-reduced gradient, then the variance frozen and the momentum
communicated 1-bit compressed with error feedback (``parallel.compressed``).

Two phases, one optimizer: ``apply_fn`` is the warm-up (the engine all-reduces gradients as for any
optimizer); ``compressed_phase(opt)`` is the same optimizer's compressed update, which takes this rank's
*local* gradient, so the engine skips its gradient all-reduce for it (DeepSpeed's
``enable_backward_allreduce = False``) and picks the phase per step on the host from the number of
applied steps (``engine.step``'s ``applied_before >= freeze_step``).

Per leaf (a flat buffer, at ZeRO stage 0 the whole group; DeepSpeed's FP16_Optimizer also hands it one
flat fp32 buffer per group):

    warm-up:     m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    compressed:  m = compressed_average(b1 m + (1 - b1) g_local)  (v frozen)
    both:        p -= lr * (m / (sqrt(v) + eps) + wd * p)

Differences from DeepSpeed, on purpose: DeepSpeed's first ``step()`` is a dummy that only allocates its
cupy buffers (the gradient of step 1 is dropped); here step 1 is a real warm-up step. At world size 1
DeepSpeed skips the compressed all-reduce (``size > 1``) but still freezes the variance: so does this.
``bias_correction`` and ``eps_inside_sqrt`` are read and ignored by DeepSpeed's 1-bit Adam (it never
bias-corrects); ``optim.config`` warns when a config sets them.

The error buffers (``worker_error`` [W, C], ``server_error`` [1, C] per leaf) are this rank's own:
``fresh_error_feedback`` replaces them with zeros, which the engine does after a checkpoint load, as
DeepSpeed's
``load_state_dict`` does (a checkpoint holds one rank's errors, and a resume at another world size could
not use them anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import optree
import torch

from zerostep.errors import ConfigError
from zerostep.optim.base import (
    Optimizer,
    PerLeaf,
    PyTree,
    Scalar,
    StepOptions,
    check_betas,
    check_range,
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
from zerostep.optim.phase_schedule import phase_schedule, with_schedule, with_variant
from zerostep.parallel.compressed import error_buffers

# (local momentum [n], worker error [W, C], server error [1, C]) -> compressed average [n]
CompressedAllReduce = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

COMM_BACKENDS = ("nccl", "mpi", "hccl", "compressed")  # DeepSpeed's comm_backend_name values


class OneBitAdamState(NamedTuple):
    count: torch.Tensor  # 0-d fp32: steps taken (both phases)
    exp_avg: PyTree
    exp_avg_sq: PyTree  # frozen after freeze_step
    worker_error: PyTree  # per leaf [W, C] ([0, 0] at world size 1)
    server_error: PyTree  # per leaf [1, C]


def check_onebit_common(
    optimizer: str,
    *,
    lr: float,
    eps: float,
    weight_decay: float,
    freeze_step: int,
    freeze_name: str,
    comm_backend_name: str,
    amsgrad: bool,
    world_size: int,
    compressed_allreduce: CompressedAllReduce | None,
) -> None:
    """The checks 1-bit Adam, 0/1 Adam and 1-bit LAMB share (``freeze_name``: the key that holds
    ``freeze_step``)."""
    check_range("lr", lr, 0.0)
    check_range("eps", eps, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    if isinstance(freeze_step, bool) or not float(freeze_step).is_integer() or freeze_step < 0:
        raise ConfigError(
            f"optimizer.params.{freeze_name}: {freeze_step!r} is invalid; it must be an integer >= 0"
        )
    if comm_backend_name not in COMM_BACKENDS:
        raise ConfigError(
            f"optimizer.params.comm_backend_name: {comm_backend_name!r} is not a DeepSpeed comm backend; "
            f"use one of {list(COMM_BACKENDS)} (zerostep runs it over its own process group)"
        )
    if amsgrad:
        raise ConfigError(
            "optimizer.params.amsgrad: unsupported (DeepSpeed's compressed optimizers reject it)"
        )
    if world_size > 1 and compressed_allreduce is None:
        raise ValueError(f"{optimizer}: world_size > 1 needs a compressed_allreduce to average the momentum")


def init_error_buffers(params: PyTree, world_size: int) -> tuple[PyTree, PyTree]:
    worker = optree.tree_map(lambda p: error_buffers(p.numel(), world_size, p.device)[0], params)
    server = optree.tree_map(lambda p: error_buffers(p.numel(), world_size, p.device)[1], params)
    return worker, server


def onebit_adam(
    lr: float = 1e-3,
    freeze_step: int = 100000,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
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
    """DeepSpeed's OnebitAdam (module docstring). ``compressed_allreduce``: how the engine averages a
    momentum buffer over its ranks (None at world size 1: the momentum stays local). ``padding``: per
    leaf, the ``(start, stop)`` ranges no parameter covers; the compressed average writes ``±scale``
    there too (sign(0) = +1), where the variance is 0, so they are zeroed after it (DeepSpeed's
    ``exp_avg_mask``, which its users set for the same reason)."""
    b1, b2 = check_betas(betas)
    check_onebit_common(
        "onebit_adam",
        lr=lr,
        eps=eps,
        weight_decay=weight_decay,
        freeze_step=freeze_step,
        freeze_name="freeze_step",
        comm_backend_name=comm_backend_name,
        amsgrad=amsgrad,
        world_size=world_size,
        compressed_allreduce=compressed_allreduce,
    )
    hyper = dict(
        lr=lr,
        freeze_step=int(freeze_step),
        betas=(b1, b2),
        eps=eps,
        weight_decay=weight_decay,
        comm_backend_name=comm_backend_name,
        cuda_aware=cuda_aware,
        world_size=world_size,
    )

    def init(params: PyTree) -> OneBitAdamState:
        worker, server = init_error_buffers(params, world_size)
        return OneBitAdamState(
            step_count(params), zeros_like_state(params), zeros_like_state(params), worker, server
        )

    def run(compressed: bool) -> Callable[..., None]:
        def apply(
            grads: PyTree, state: OneBitAdamState, params: PyTree, lr: Scalar, opts: StepOptions
        ) -> None:
            beta1 = b1 if opts.beta1 is None else opts.beta1
            beta2 = b2 if opts.beta2 is None else opts.beta2
            state.count.add_(1)
            p_leaves, (g_leaves, m_leaves, v_leaves, w_leaves, s_leaves) = leaves_like(
                params, grads, state.exp_avg, state.exp_avg_sq, state.worker_error, state.server_error
            )
            c_leaves = per_leaf(opts.param_copies, params, None)
            masks = per_leaf(weight_decay_mask, params, True)
            mults = per_leaf(lr_multipliers, params, 1.0)
            pads = per_leaf(padding, params, ())
            leaves = zip(
                p_leaves, g_leaves, m_leaves, v_leaves, w_leaves, s_leaves, c_leaves, masks, mults, pads
            )
            for p, g, m, v, we, se, copy, mask, mult, pad in leaves:
                g = prepared_grad(g, opts.grad_scale, m.dtype)
                m.mul_(beta1).add_(g * (1 - beta1))
                if not compressed:
                    v.mul_(beta2).add_(g * g * (1 - beta2))
                elif compressed_allreduce is not None:
                    m.copy_(compressed_allreduce(m, we, se))
                    for start, stop in pad:
                        m[start:stop].zero_()
                step_leaf_(
                    p,
                    m,
                    v,
                    lr if is_static(mult, 1) else lr * mult,
                    eps,
                    masked_weight_decay(weight_decay, mask),
                    copy,
                )

        return apply

    frozen_after = int(freeze_step)
    apply = with_schedule(
        {"warm-up": run(compressed=False), "compressed": run(compressed=True)},
        "warm-up",
        {"warm-up": 0, "compressed": 1},
        lambda k: "warm-up" if k <= frozen_after else "compressed",
    )
    return Optimizer(name="onebitadam", lr=float(lr), hyperparams=hyper, init_fn=init, apply_fn=apply)


def step_leaf_(
    p: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    lr: Scalar,
    eps: float,
    weight_decay: Scalar,
    copy: torch.Tensor | None,
) -> None:
    """``p -= lr * (m / (sqrt(v) + eps) + wd * p)``: DeepSpeed's order (the decay joins the update)."""
    pw = compute_view(p)
    update = m / (v.sqrt() + eps)
    if not is_static(weight_decay, 0):
        update = update + weight_decay * pw
    pw.sub_(update * lr)
    finish_param(p, pw, copy)


def compressed_phase(optimizer: Optimizer) -> Optimizer | None:
    """1-bit Adam's update after its freeze step (local gradients in, compressed momentum), or None
    for an optimizer without a ``compressed`` variant (optim/phase_schedule.py)."""
    schedule = phase_schedule(optimizer)
    if schedule is None or "compressed" not in schedule.variants:
        return None
    return with_variant(optimizer, "compressed")


def fresh_error_feedback(opt_state: OneBitAdamState, master: PyTree, world_size: int) -> OneBitAdamState:
    """``opt_state`` with zero error buffers sized for ``world_size`` (after a checkpoint load; the
    other leaves are kept)."""
    worker, server = init_error_buffers(master, world_size)
    return opt_state._replace(worker_error=worker, server_error=server)
