"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), as DeepSpeed's FusedLion.

``c = beta1 * m + (1 - beta1) * g``; ``p = p * (1 - lr * wd) - lr * sign(c)``;
``m = beta2 * m + (1 - beta2) * g``. One moment, decoupled weight decay, no bias correction.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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


class LionState(NamedTuple):
    count: torch.Tensor  # 0-d fp32: steps taken (Lion itself does not use it)
    exp_avg: PyTree


def lion(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    *,
    weight_decay_mask: PerLeaf = None,
    lr_multipliers: PerLeaf = None,
) -> Optimizer:
    """DeepSpeed's FusedLion (defaults lr 1e-3, betas (0.9, 0.999), weight_decay 0)."""
    b1, b2 = check_betas(betas)
    check_range("lr", lr, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    hyper = dict(lr=lr, betas=(b1, b2), weight_decay=weight_decay)

    def init(params: PyTree) -> LionState:
        return LionState(step_count(params), zeros_like_state(params))

    def apply(grads: PyTree, state: LionState, params: PyTree, lr: Scalar, opts: StepOptions) -> None:
        beta1 = b1 if opts.beta1 is None else opts.beta1
        beta2 = b2 if opts.beta2 is None else opts.beta2
        state.count.add_(1)
        p_leaves, (g_leaves, m_leaves) = leaves_like(params, grads, state.exp_avg)
        c_leaves = per_leaf(opts.param_copies, params, None)
        masks = per_leaf(weight_decay_mask, params, True)
        mults = per_leaf(lr_multipliers, params, 1.0)
        for p, g, m, copy, mask, mult in zip(p_leaves, g_leaves, m_leaves, c_leaves, masks, mults):
            leaf_lr = lr if is_static(mult, 1) else lr * mult
            wd = masked_weight_decay(weight_decay, mask)
            pw = compute_view(p)
            g = prepared_grad(g, opts.grad_scale, m.dtype)
            direction = torch.sign(m * beta1 + g * (1 - beta1))
            if not is_static(wd, 0):
                pw.mul_(1 - leaf_lr * wd)
            pw.sub_(direction * leaf_lr)
            m.mul_(beta2).add_(g * (1 - beta2))
            finish_param(p, pw, copy)

    return Optimizer(name="lion", lr=float(lr), hyperparams=hyper, init_fn=init, apply_fn=apply)
