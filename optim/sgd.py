"""SGD with momentum, dampening, Nesterov and L2 weight decay, exactly as torch.optim.SGD.

torch creates the momentum buffer on the first step as a copy of the gradient (no dampening);
here the buffer exists from ``init`` (zeros) and the first step selects the gradient with
``torch.where(count == 1, ...)``, which keeps the update a fixed graph for ``torch.compile``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from zerostep.errors import ConfigError
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
    state_dtype,
    step_count,
    zeros_like_state,
)


class SgdState(NamedTuple):
    count: torch.Tensor  # 0-d fp32: steps taken
    momentum_buffer: PyTree  # an empty dict when momentum is 0 (no buffer, as in torch)


def sgd(
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    weight_decay_mask: PerLeaf = None,
    lr_multipliers: PerLeaf = None,
) -> Optimizer:
    """torch.optim.SGD. ``beta1`` passed to ``update`` overrides ``momentum`` (when momentum > 0)."""
    check_range("lr", lr, 0.0)
    check_range("momentum", momentum, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ConfigError("optimizer.params.nesterov: true requires momentum > 0 and dampening 0 (as torch)")
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    has_buffer = momentum != 0

    def init(params: PyTree) -> SgdState:
        return SgdState(step_count(params), zeros_like_state(params) if has_buffer else {})

    def apply(grads: PyTree, state: SgdState, params: PyTree, lr: Scalar, opts: StepOptions) -> None:
        mom = momentum if opts.beta1 is None else opts.beta1
        count = state.count
        count.add_(1)
        first = count == 1
        if has_buffer:
            p_leaves, (g_leaves, b_leaves) = leaves_like(params, grads, state.momentum_buffer)
        else:
            p_leaves, (g_leaves,) = leaves_like(params, grads)
            b_leaves = [None] * len(p_leaves)
        c_leaves = per_leaf(opts.param_copies, params, None)
        masks = per_leaf(weight_decay_mask, params, True)
        mults = per_leaf(lr_multipliers, params, 1.0)
        for p, g, buf, copy, mask, mult in zip(p_leaves, g_leaves, b_leaves, c_leaves, masks, mults):
            leaf_lr = lr if is_static(mult, 1) else lr * mult
            wd = masked_weight_decay(weight_decay, mask)
            pw = compute_view(p)
            g = prepared_grad(g, opts.grad_scale, state_dtype(pw))
            if not is_static(wd, 0):
                g = g + pw * wd
            if buf is not None:
                buf.copy_(torch.where(first, g, buf * mom + g * (1 - dampening)))
                g = g + buf * mom if nesterov else buf
            if isinstance(leaf_lr, torch.Tensor):
                pw.sub_(g * leaf_lr)
            else:
                pw.add_(g, alpha=-leaf_lr)
            finish_param(p, pw, copy)

    return Optimizer(name="sgd", lr=float(lr), hyperparams=hyper, init_fn=init, apply_fn=apply,
                     cycles_momentum=False)
