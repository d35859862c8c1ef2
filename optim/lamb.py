"""LAMB (You et al. 2019, Algorithm 2) with DeepSpeed FusedLamb's semantics.

Per tensor: Adam moments with bias correction applied to ``m`` and ``v`` themselves,
``update = m_hat / (sqrt(v_hat) + eps) + weight_decay * p``, trust ratio ``||p|| / ||update||``
clamped to ``[min_coeff, max_coeff]`` (1 when either norm is 0), then ``p -= lr * ratio * update``.
Both norms use ``p`` before the step. Like FusedLamb, the trust ratio is per tensor the optimizer
is handed: over a flat shard that is the whole shard; ``norm_reduce`` (e.g. an all-reduce sum)
lets a sharded caller make it the norm of the full buffer. Under model parallelism ``model_parallel``
(per leaf, an ``optim.model_parallel.SplitSegments``) completes the norms of parameters split over the
model-parallel group by a sum over it, after ``norm_reduce``; replicated parameters keep their own.

On CUDA with triton, each leaf takes two fused passes: moments + partial norms, then the apply.
"""

from __future__ import annotations

from collections.abc import Callable
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
from zerostep.optim.model_parallel import SplitSegments, complete_sums


class TrustSegments(NamedTuple):
    """Static description of a flat leaf as pieces of parameters: ``(start, stop, index)`` element
    ranges of the leaf, ``index`` in ``[0, n_segments)`` naming the parameter (several ranks' pieces of
    one parameter share an index, and ``norm_reduce`` sums their partial norms)."""

    pieces: tuple[tuple[int, int, int], ...]
    n_segments: int


class LambState(NamedTuple):
    count: torch.Tensor  # 0-d fp32: steps taken
    exp_avg: PyTree
    exp_avg_sq: PyTree


def lamb(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    bias_correction: bool = True,
    eps_inside_sqrt: bool = False,
    max_coeff: float = 10.0,
    min_coeff: float = 0.01,
    amsgrad: bool = False,
    weight_decay_mask: PerLeaf = None,
    lr_multipliers: PerLeaf = None,
    norm_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    use_triton: bool | None = None,
    trust_segments: PerLeaf = None,
    model_parallel: PerLeaf = None,
) -> Optimizer:
    """DeepSpeed's FusedLamb. ``norm_reduce`` maps a leaf's local ``[sum p^2, sum update^2]`` (or, with
    segments, ``[2, n_segments]``) to the global sums (identity when None).

    ``trust_segments``: per leaf, None or a ``TrustSegments`` saying which element ranges of a flat leaf
    belong to which parameter, so that each parameter gets its own trust ratio as with unflattened
    tensors (the engine passes this for its flat ZeRO shards). ``model_parallel``: per leaf, None or a
    ``SplitSegments`` over the same segment indices (needs ``trust_segments``): which parameters are
    shards of a tensor-parallel split, whose norms are summed over the model-parallel group."""
    b1, b2 = check_betas(betas)
    check_range("lr", lr, 0.0)
    check_range("eps", eps, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    check_range("min_coeff", min_coeff, 0.0)
    if max_coeff < min_coeff:
        raise ConfigError(f"optimizer.params.max_coeff: {max_coeff!r} is invalid; it must be >= min_coeff "
                          f"({min_coeff!r})")
    if amsgrad:
        raise ConfigError("optimizer.params.amsgrad: unsupported (DeepSpeed's FusedLamb rejects it too)")
    hyper = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                 eps_inside_sqrt=eps_inside_sqrt, max_coeff=max_coeff, min_coeff=min_coeff)

    def init(params: PyTree) -> LambState:
        return LambState(step_count(params), zeros_like_state(params), zeros_like_state(params))

    def trust_ratio(sums: torch.Tensor, mp: SplitSegments | None = None) -> torch.Tensor:
        """[2] -> [] or [2, k] -> [k]: the clamped ratio ||p|| / ||update|| (1 where either is 0)."""
        if norm_reduce is not None:
            sums = norm_reduce(sums)
        sums = complete_sums(sums, mp)
        norms = sums.sqrt()
        w_norm, u_norm = norms[0], norms[1]
        ratio = (w_norm / u_norm).clamp(min_coeff, max_coeff)
        return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))

    def apply(grads: PyTree, state: LambState, params: PyTree, lr: Scalar, opts: StepOptions) -> None:
        beta1 = b1 if opts.beta1 is None else opts.beta1
        beta2 = b2 if opts.beta2 is None else opts.beta2
        count = state.count
        count.add_(1)
        t = count.double()  # fp64: 1 - beta2**t cancels catastrophically in fp32
        bc1, bc2 = loop_invariant(1 - beta1**t, 1 - beta2**t) if bias_correction else (1.0, 1.0)
        p_leaves, (g_leaves, m_leaves, v_leaves) = leaves_like(params, grads, state.exp_avg, state.exp_avg_sq)
        c_leaves = per_leaf(opts.param_copies, params, None)
        masks = per_leaf(weight_decay_mask, params, True)
        mults = per_leaf(lr_multipliers, params, 1.0)
        segments = per_leaf(trust_segments, params, None)
        splits = per_leaf(model_parallel, params, None)
        leaves = zip(p_leaves, g_leaves, m_leaves, v_leaves, c_leaves, masks, mults, segments, splits)
        for p, g, m, v, copy, mask, mult, seg, mp in leaves:
            if mp is not None and seg is None:
                raise ValueError("lamb: model_parallel needs trust_segments (which parameter each is)")
            leaf_lr = lr if is_static(mult, 1) else lr * mult
            wd = masked_weight_decay(weight_decay, mask)
            if seg is None and triton_kernels.usable(use_triton, (p, g, m, v), (wd, mult)):
                scalars = triton_kernels.adam_scalars(leaf_lr, opts.grad_scale, beta1, beta2, bc1, bc2,
                                                      p.device)
                sums = triton_kernels.lamb_update_norms_(p, g, m, v, scalars, eps=eps, weight_decay=float(wd),
                                                         eps_inside_sqrt=eps_inside_sqrt)
                scalars = torch.cat([scalars, trust_ratio(sums).reshape(1)])
                triton_kernels.lamb_apply_(p, m, v, scalars, eps=eps, weight_decay=float(wd),
                                           eps_inside_sqrt=eps_inside_sqrt, out=copy)
                continue
            pw = compute_view(p)
            g = prepared_grad(g, opts.grad_scale, m.dtype)
            m.mul_(beta1).add_(g * (1 - beta1))
            v.mul_(beta2).add_(g * g * (1 - beta2))
            v_hat = v / bc2
            denom = (v_hat + eps).sqrt() if eps_inside_sqrt else v_hat.sqrt() + eps
            update = (m / bc1) / denom
            if not is_static(wd, 0):
                update = update + wd * pw
            if seg is None:
                sums = torch.stack([(pw * pw).sum(), (update * update).sum()])
                pw.sub_(update * (leaf_lr * trust_ratio(sums)))
            else:
                apply_segmented(pw, update, leaf_lr, seg, mp)
            finish_param(p, pw, copy)

    def apply_segmented(
        pw: torch.Tensor, update: torch.Tensor, leaf_lr: Scalar, seg: TrustSegments, mp: SplitSegments | None
    ) -> None:
        # Partial sums per piece, scattered into per-parameter sums [2, n_segments] (a piece is the part
        # of one parameter inside this flat leaf; static, so the loop unrolls in a compiled graph).
        columns = [torch.zeros((), dtype=torch.float32, device=pw.device)] * seg.n_segments
        columns = [list(columns), list(columns)]
        for start, stop, index in seg.pieces:
            columns[0][index] = columns[0][index] + (pw[start:stop] * pw[start:stop]).sum()
            columns[1][index] = columns[1][index] + (update[start:stop] * update[start:stop]).sum()
        sums = torch.stack([torch.stack(columns[0]), torch.stack(columns[1])])  # [2, n_segments]
        ratio = trust_ratio(sums, mp)  # [n_segments]
        for start, stop, index in seg.pieces:
            pw[start:stop].sub_(update[start:stop] * (leaf_lr * ratio[index]))

    return Optimizer(name="lamb", lr=float(lr), hyperparams=hyper, init_fn=init, apply_fn=apply)
