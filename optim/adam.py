"""Adam and AdamW with torch.optim's exact update (eps outside the root, bias-corrected step size).

DeepSpeed's FusedAdam computes the same values: its AdamW mode subtracts ``lr * (update + wd * p)``,
which is torch's ``p *= 1 - lr * wd`` followed by the Adam step. On CUDA, with triton importable,
each leaf is updated by one fused Triton kernel (``triton_kernels.adam_step_``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from zerostep.errors import ConfigError
from zerostep.optim import triton_kernels
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
    loop_invariant,
    masked_weight_decay,
    per_leaf,
    prepared_grad,
    step_count,
    zeros_like_state,
)


class AdamState(NamedTuple):
    count: torch.Tensor  # 0-d fp32: steps taken
    exp_avg: PyTree
    exp_avg_sq: PyTree


def adam(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    adam_w_mode: bool = False,
    bias_correction: bool = True,
    amsgrad: bool = False,
    weight_decay_mask: PerLeaf = None,
    lr_multipliers: PerLeaf = None,
    use_triton: bool | None = None,
) -> Optimizer:
    """torch.optim.Adam (L2 weight decay added to the gradient), or AdamW with ``adam_w_mode``.

    ``use_triton``: None picks the fused Triton kernel for CUDA tensors when triton imports;
    False always uses the torch ops; True also requires it (an error when triton is missing).
    """
    b1, b2 = check_betas(betas)
    check_range("lr", lr, 0.0)
    check_range("eps", eps, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    if amsgrad:
        raise ConfigError("optimizer.params.amsgrad: unsupported (DeepSpeed's FusedAdam rejects it too)")
    if use_triton and not triton_kernels.available():
        raise ConfigError("use_triton=True but triton is not importable; install zerostep[gpu]")
    hyper = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode,
                 bias_correction=bias_correction)

    def init(params: PyTree) -> AdamState:
        return AdamState(step_count(params), zeros_like_state(params), zeros_like_state(params))

    def apply(grads: PyTree, state: AdamState, params: PyTree, lr: Scalar, opts: StepOptions) -> None:
        beta1 = b1 if opts.beta1 is None else opts.beta1
        beta2 = b2 if opts.beta2 is None else opts.beta2
        count = state.count
        count.add_(1)
        if bias_correction:
            # fp64: 1 - beta2**t cancels catastrophically in fp32 (beta2 = 0.999 loses 4 digits).
            t = count.double()
            bc1 = 1 - beta1**t
            bc2_sqrt = (1 - beta2**t).sqrt()
            bc1, bc2_sqrt = loop_invariant(bc1, bc2_sqrt)
        else:
            bc1, bc2_sqrt = 1.0, 1.0
        p_leaves, (g_leaves, m_leaves, v_leaves) = leaves_like(params, grads, state.exp_avg, state.exp_avg_sq)
        c_leaves = per_leaf(opts.param_copies, params, None)
        masks = per_leaf(weight_decay_mask, params, True)
        mults = per_leaf(lr_multipliers, params, 1.0)
        leaves = zip(p_leaves, g_leaves, m_leaves, v_leaves, c_leaves, masks, mults)
        for p, g, m, v, copy, mask, mult in leaves:
            leaf_lr = lr if is_static(mult, 1) else lr * mult
            wd = masked_weight_decay(weight_decay, mask)
            if triton_kernels.usable(use_triton, (p, g, m, v), (wd, mult)):
                scalars = triton_kernels.adam_scalars(leaf_lr, opts.grad_scale, beta1, beta2, bc1, bc2_sqrt,
                                                      p.device)
                triton_kernels.adam_step_(p, g, m, v, scalars, eps=eps, weight_decay=float(wd),
                                          adam_w_mode=adam_w_mode, out=copy)
                continue
            adam_leaf_(p, g, m, v, lr=leaf_lr, beta1=beta1, beta2=beta2, bc1=bc1, bc2_sqrt=bc2_sqrt, eps=eps,
                       weight_decay=wd, adam_w_mode=adam_w_mode, grad_scale=opts.grad_scale, copy=copy)

    name = "adamw" if adam_w_mode else "adam"
    return Optimizer(name=name, lr=float(lr), hyperparams=hyper, init_fn=init, apply_fn=apply)


def adamw(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    bias_correction: bool = True,
    amsgrad: bool = False,
    weight_decay_mask: PerLeaf = None,
    lr_multipliers: PerLeaf = None,
    use_triton: bool | None = None,
) -> Optimizer:
    """torch.optim.AdamW: decoupled weight decay (``p *= 1 - lr * wd``); torch's default wd of 0.01."""
    return adam(lr, betas, eps, weight_decay, adam_w_mode=True, bias_correction=bias_correction,
                amsgrad=amsgrad, weight_decay_mask=weight_decay_mask, lr_multipliers=lr_multipliers,
                use_triton=use_triton)


def adam_leaf_(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    lr: Scalar,
    beta1: Scalar,
    beta2: Scalar,
    bc1: Scalar,
    bc2_sqrt: Scalar,
    eps: float,
    weight_decay: Scalar,
    adam_w_mode: bool,
    grad_scale: Scalar | None,
    copy: torch.Tensor | None,
) -> None:
    """One Adam step of one tensor in place, in torch.optim's order of operations.

    Written as elementwise ops over ``p, g, m, v`` only, so inductor fuses the whole step into one
    loop that reads each tensor once and writes ``p, m, v`` once.
    """
    pw = compute_view(p)
    g = prepared_grad(g, grad_scale, m.dtype)
    if not is_static(weight_decay, 0):
        if adam_w_mode:
            pw.mul_(1 - lr * weight_decay)
        else:
            g = g + pw * weight_decay
    m.lerp_(g, 1 - beta1)
    if isinstance(beta2, torch.Tensor):
        v.mul_(beta2).add_(g * g * (1 - beta2))
    else:
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    step_size = lr / bc1
    if isinstance(step_size, torch.Tensor):
        pw.sub_(m / denom * step_size)
    else:
        pw.addcdiv_(m, denom, value=-step_size)
    finish_param(p, pw, copy)
