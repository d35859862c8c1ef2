"""Adagrad exactly as torch.optim.Adagrad (what DeepSpeed builds for ``"type": "Adagrad"``).

``clr = lr / (1 + (step - 1) * lr_decay)``; ``sum += g^2``; ``p -= clr * g / (sqrt(sum) + eps)``,
with L2 weight decay added to the gradient and the sum starting at ``initial_accumulator_value``.
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


class AdagradState(NamedTuple):
    count: torch.Tensor  # 0-d fp32: steps taken
    sum: PyTree  # running sum of squared gradients


def adagrad(
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    *,
    weight_decay_mask: PerLeaf = None,
    lr_multipliers: PerLeaf = None,
) -> Optimizer:
    """torch.optim.Adagrad. It has no betas, so DeepSpeed's OneCycle does not cycle its momentum."""
    check_range("lr", lr, 0.0)
    check_range("lr_decay", lr_decay, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    check_range("initial_accumulator_value", initial_accumulator_value, 0.0)
    check_range("eps", eps, 0.0)
    hyper = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                 initial_accumulator_value=initial_accumulator_value, eps=eps)

    def init(params: PyTree) -> AdagradState:
        return AdagradState(step_count(params), zeros_like_state(params, initial_accumulator_value))

    def apply(grads: PyTree, state: AdagradState, params: PyTree, lr: Scalar, opts: StepOptions) -> None:
        count = state.count
        count.add_(1)
        clr = lr / (1 + (count.double() - 1) * lr_decay) if lr_decay != 0 else lr
        p_leaves, (g_leaves, s_leaves) = leaves_like(params, grads, state.sum)
        c_leaves = per_leaf(opts.param_copies, params, None)
        masks = per_leaf(weight_decay_mask, params, True)
        mults = per_leaf(lr_multipliers, params, 1.0)
        for p, g, s, copy, mask, mult in zip(p_leaves, g_leaves, s_leaves, c_leaves, masks, mults):
            leaf_clr = clr if is_static(mult, 1) else clr * mult
            wd = masked_weight_decay(weight_decay, mask)
            pw = compute_view(p)
            g = prepared_grad(g, opts.grad_scale, s.dtype)
            if not is_static(wd, 0):
                g = g + pw * wd
            s.addcmul_(g, g, value=1)
            std = s.sqrt().add_(eps)
            if isinstance(leaf_clr, torch.Tensor):
                pw.sub_(g / std * leaf_clr)
            else:
                pw.addcdiv_(g, std, value=-leaf_clr)
            finish_param(p, pw, copy)

    return Optimizer(name="adagrad", lr=float(lr), hyperparams=hyper, init_fn=init, apply_fn=apply,
                     cycles_momentum=False)
