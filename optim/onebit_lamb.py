"""1-bit LAMB (Li et al. 2021) as DeepSpeed's ``OnebitLamb`` (deepspeed/runtime/fp16/onebit/lamb.py,
removed after 0.17) runs it: LAMB without bias correction for ``freeze_step`` steps on the all-reduced
gradient, tracking each tensor's trust ratio; then the variance frozen, the momentum communicated 1-bit
compressed with error feedback, and each tensor's frozen trust ratio scaled by a bounded factor.

Per parameter tensor (a segment of a flat leaf: ``segments`` gives each leaf's ``(start, stop)``
element ranges, one per parameter, as the engine lays them out; without it a leaf is one tensor), with
``d = sqrt(v) + eps``:

- ``warm-up`` (steps ``k <= freeze_step``; zerostep's step ``k`` is DeepSpeed's ``state['step'] == k``,
  whose step 1 is a dummy that only allocates buffers: here it is a real step):
  ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``; ``update = m / d + wd p``;
  ``c = clamp(||p|| / ||update||, min_coeff, max_coeff)`` (1 where either norm is 0);
  where ``c != 1``: ``coeff_freeze = coeff_beta coeff_freeze + (1 - coeff_beta) c``; ``p -= lr c update``;
- ``first-compressed`` (step ``freeze_step + 1``) first sets ``exp_avg_sq_fresh = v`` and each tensor's
  ``scaling_coeff = mean_t(rms(m_t)) / rms(m)`` (the mean over every tensor of every leaf; 1 for a tensor
  whose momentum is 0, where DeepSpeed divides by zero), then runs ``compressed``:
- ``compressed``: ``m_last = m``; ``m = C((b1 m + (1 - b1) g_local) * scaling_coeff) / scaling_coeff``
  (``C``: the compressed average); ``g_r = (m - b1 m_last) / (1 - b1)``;
  ``v_fresh = b2 v_fresh + (1 - b2) g_r^2``; ``update = m / d + wd p``;
  ``f = max(d / (sqrt(v_fresh) + eps))``; with weight decay ``r = min(1, ||m / d|| / ||update||)``,
  ``f = f r + 1 - r``; ``f`` clamped to ``[factor_min, factor_max]`` then to
  ``last_factor * [1 - factor_threshold, 1 + factor_threshold]``; ``last_factor = f``;
  ``p -= lr coeff_freeze f update``.

Per-tensor values are ``[1, S]`` state leaves (2-D: not flat shards; S tensors of the leaf), saved with
the state. As for 1-bit Adam, a checkpoint load restarts the error feedback; at world size 1 the
compressed average is the identity (DeepSpeed skips it too). ``bias_correction`` and ``eps_inside_sqrt``
are read and ignored (as DeepSpeed's); ``optim.config`` warns when a config sets them.

Under tensor parallelism (``model_parallel``: per leaf an ``optim.model_parallel.SplitSegments``) every
per-tensor value is the whole parameter's: the norms and the momentum RMS of a split parameter are summed
over the model-parallel group (its size the full one), the factor's maximum taken over it; the compressed
exchange stays over the data-parallel ranks (``compressed_allreduce``), each rank compressing its shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
from zerostep.optim.model_parallel import SplitSegments, complete_maxima, complete_sums, full_sizes
from zerostep.optim.onebit_adam import CompressedAllReduce, check_onebit_common, init_error_buffers
from zerostep.optim.phase_schedule import with_schedule

WARM_UP, FIRST, COMPRESSED = "warm-up", "first-compressed", "compressed"


class OneBitLambState(NamedTuple):
    count: torch.Tensor  # 0-d fp32: steps taken
    exp_avg: PyTree
    exp_avg_sq: PyTree  # frozen after freeze_step
    exp_avg_sq_fresh: PyTree  # the variance the compressed phase goes on estimating (for the factor)
    lamb_coeff_freeze: PyTree  # per leaf [1, S]: the trust ratios' moving average
    last_factor: PyTree  # per leaf [1, S]
    scaling_coeff: PyTree  # per leaf [1, S]: set at the first compressed step
    worker_error: PyTree
    server_error: PyTree


class Segments:
    """A flat leaf [n] as S parameter tensors: per-tensor sums and maxima, and per-tensor values spread
    back over the leaf (``gap`` over the ranges no parameter covers). Python ints only, so a compiled
    warm-up traces it into static slices."""

    def __init__(self, numel: int, pieces: Sequence[tuple[int, int]]) -> None:
        pieces = sorted(pieces) or [(0, numel)]
        sizes, owner, at = [], [], 0  # a partition of [0, n): pieces and the gaps between them
        for index, (start, stop) in enumerate(pieces):
            if start > at:
                sizes.append(start - at)
                owner.append(None)
            sizes.append(stop - start)
            owner.append(index)
            at = stop
        if at < numel:
            sizes.append(numel - at)
            owner.append(None)
        self.count, self.sizes, self.owner = len(pieces), sizes, owner
        self.piece_sizes = [s for s, o in zip(sizes, owner) if o is not None]

    def _parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [part for part, o in zip(x.split(self.sizes), self.owner) if o is not None]

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([part.sum() for part in self._parts(x)])  # [S]

    def maxima(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([part.max() for part in self._parts(x)])  # [S]

    def spread(self, values: torch.Tensor, gap: float = 0.0) -> torch.Tensor:
        """values [S] -> [n]: each tensor's value over its elements, ``gap`` elsewhere."""
        values = values.reshape(-1)
        filler = values.new_full((1,), gap)
        return torch.cat(
            [(filler[0] if o is None else values[o]).expand(size) for size, o in zip(self.sizes, self.owner)]
        )


def onebit_lamb(
    lr: float = 1e-3,
    freeze_step: int = 100000,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    max_coeff: float = 10.0,
    min_coeff: float = 0.01,
    coeff_beta: float = 0.9,
    factor_max: float = 4.0,
    factor_min: float = 0.5,
    factor_threshold: float = 0.1,
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
    segments: PerLeaf = None,
    model_parallel: PerLeaf = None,
) -> Optimizer:
    """DeepSpeed's OnebitLamb (module docstring). ``segments``: per leaf, the parameters' ``(start,
    stop)`` ranges (in offset order); ``model_parallel``: per leaf, None or the ``SplitSegments`` of those
    parameters; the other engine-supplied arguments as ``onebit_adam``'s."""
    b1, b2 = check_betas(betas)
    check_onebit_common(
        "onebit_lamb",
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
    for name, value in (
        ("min_coeff", min_coeff),
        ("factor_min", factor_min),
        ("factor_threshold", factor_threshold),
    ):
        check_range(name, value, 0.0)
    check_range("coeff_beta", coeff_beta, 0.0, 1.0)
    if max_coeff < min_coeff:
        raise ConfigError(
            f"optimizer.params.max_coeff: {max_coeff!r} is invalid; it must be >= min_coeff ({min_coeff!r})"
        )
    if factor_max < factor_min:
        raise ConfigError(
            f"optimizer.params.factor_max: {factor_max!r} is invalid; it must be >= "
            f"factor_min ({factor_min!r})"
        )
    frozen_after = int(freeze_step)
    hyper = dict(
        lr=lr,
        freeze_step=frozen_after,
        betas=(b1, b2),
        eps=eps,
        weight_decay=weight_decay,
        max_coeff=max_coeff,
        min_coeff=min_coeff,
        coeff_beta=coeff_beta,
        factor_max=factor_max,
        factor_min=factor_min,
        factor_threshold=factor_threshold,
        comm_backend_name=comm_backend_name,
        cuda_aware=cuda_aware,
        world_size=world_size,
    )
    cache: dict[tuple, Segments] = {}

    def segments_of(p: torch.Tensor, pieces: Sequence[tuple[int, int]] | None) -> Segments:
        key = (p.numel(), tuple(pieces or ()))
        if key not in cache:
            cache[key] = Segments(p.numel(), pieces or ())
        return cache[key]

    def per_tensor(params: PyTree, fill: float) -> PyTree:
        seg = per_leaf(segments, params, None)
        leaves, spec = optree.tree_flatten(params)
        out = [
            torch.full((1, segments_of(p, s).count), fill, dtype=torch.float32, device=p.device)
            for p, s in zip(leaves, seg)
        ]
        return optree.tree_unflatten(spec, out)

    def init(params: PyTree) -> OneBitLambState:
        worker, server = init_error_buffers(params, world_size)
        return OneBitLambState(
            step_count(params),
            zeros_like_state(params),
            zeros_like_state(params),
            zeros_like_state(params),
            per_tensor(params, 0.0),
            per_tensor(params, 1.0),
            per_tensor(params, 1.0),
            worker,
            server,
        )

    def start_compressed(state: OneBitLambState, params: PyTree) -> None:
        # DeepSpeed computes these as its first compressed step begins, from the warm-up's last m and v
        p_leaves, (m_leaves, v_leaves, f_leaves, s_leaves) = leaves_like(
            params, state.exp_avg, state.exp_avg_sq, state.exp_avg_sq_fresh, state.scaling_coeff
        )
        rms = []
        splits = per_leaf(model_parallel, params, None)
        for p, m, seg, mp in zip(p_leaves, m_leaves, per_leaf(segments, params, None), splits):
            segs = segments_of(p, seg)
            sizes = full_sizes(torch.tensor(segs.piece_sizes, dtype=torch.float32, device=m.device), mp)
            # [S] ||m_t|| / sqrt(numel_t), over the whole parameters
            rms.append(complete_sums(segs.sums(m * m), mp).sqrt() / sizes.sqrt())
        united = torch.cat(rms).mean()
        for v, fresh, sc, r in zip(v_leaves, f_leaves, s_leaves, rms):
            fresh.copy_(v)
            sc.copy_(torch.where(r > 0, united / r, torch.ones_like(r)).reshape(sc.shape))

    def warm_up_coeff(
        pw: torch.Tensor,
        g: torch.Tensor,
        m: torch.Tensor,
        v: torch.Tensor,
        cf: torch.Tensor,
        wd: Scalar,
        segs: Segments,
        mp: SplitSegments | None,
        beta1: Scalar,
        beta2: Scalar,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LAMB's moments and clamped per-tensor trust ratio [S]; moves ``coeff_freeze``."""
        m.mul_(beta1).add_(g * (1 - beta1))
        v.mul_(beta2).add_(g * g * (1 - beta2))
        update = m / (v.sqrt() + eps)
        if not is_static(wd, 0):
            update = update + wd * pw
        sums = complete_sums(torch.stack([segs.sums(pw * pw), segs.sums(update * update)]), mp)  # [2, S]
        w_norm, u_norm = sums[0].sqrt(), sums[1].sqrt()
        ratio = torch.where(
            (w_norm > 0) & (u_norm > 0),
            (w_norm / u_norm).clamp(min_coeff, max_coeff),
            torch.ones_like(w_norm),
        )
        moved = coeff_beta * cf.reshape(-1) + (1 - coeff_beta) * ratio
        cf.copy_(torch.where(ratio != 1, moved, cf.reshape(-1)).reshape(cf.shape))
        return ratio, update

    def compressed_coeff(
        pw: torch.Tensor,
        g: torch.Tensor,
        m: torch.Tensor,
        v: torch.Tensor,
        fresh: torch.Tensor,
        cf: torch.Tensor,
        last: torch.Tensor,
        sc: torch.Tensor,
        we: torch.Tensor,
        se: torch.Tensor,
        wd: Scalar,
        pad: tuple,
        segs: Segments,
        mp: SplitSegments | None,
        beta1: Scalar,
        beta2: Scalar,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressed momentum, the fresh variance, and the frozen ratio times the factor [S]."""
        m_last = m.clone()
        m.mul_(beta1).add_(g * (1 - beta1))
        if compressed_allreduce is not None:
            scale = segs.spread(sc.reshape(-1), gap=1.0)
            m.copy_(compressed_allreduce(m * scale, we, se) / scale)
            for start, stop in pad:  # no parameter there (DeepSpeed's dummy padding / exp_avg_mask)
                m[start:stop].zero_()
        rebuilt = (m - beta1 * m_last) / (1 - beta1)  # the gradient the averaged momentum implies
        fresh.mul_(beta2).add_(rebuilt * rebuilt * (1 - beta2))
        denom = v.sqrt() + eps
        prelim = m / denom
        update = prelim if is_static(wd, 0) else prelim + wd * pw
        factor = complete_maxima(segs.maxima(denom / (fresh.sqrt() + eps)), mp)
        if not is_static(wd, 0):
            sums = complete_sums(torch.stack([segs.sums(update * update), segs.sums(prelim * prelim)]), mp)
            u_norm = sums[0].sqrt()
            kept = torch.where(u_norm > 0, sums[1].sqrt() / u_norm, torch.ones_like(u_norm))
            kept = kept.clamp(max=1.0)
            factor = factor * kept + (1 - kept)
        previous = last.reshape(-1)
        factor = factor.clamp(factor_min, factor_max)
        factor = torch.minimum(
            torch.maximum(factor, previous * (1 - factor_threshold)), previous * (1 + factor_threshold)
        )
        last.copy_(factor.reshape(last.shape))
        return cf.reshape(-1) * factor, update

    def run(variant: str) -> Callable[..., None]:
        def apply(
            grads: PyTree, state: OneBitLambState, params: PyTree, lr: Scalar, opts: StepOptions
        ) -> None:
            beta1 = b1 if opts.beta1 is None else opts.beta1
            beta2 = b2 if opts.beta2 is None else opts.beta2
            state.count.add_(1)
            if variant == FIRST:
                start_compressed(state, params)
            p_leaves, trees = leaves_like(
                params,
                grads,
                state.exp_avg,
                state.exp_avg_sq,
                state.exp_avg_sq_fresh,
                state.lamb_coeff_freeze,
                state.last_factor,
                state.scaling_coeff,
                state.worker_error,
                state.server_error,
            )
            extra = (
                per_leaf(opts.param_copies, params, None),
                per_leaf(weight_decay_mask, params, True),
                per_leaf(lr_multipliers, params, 1.0),
                per_leaf(padding, params, ()),
                per_leaf(segments, params, None),
                per_leaf(model_parallel, params, None),
            )
            for p, g, m, v, fresh, cf, last, sc, we, se, copy, mask, mult, pad, seg, mp in zip(
                p_leaves, *trees, *extra
            ):
                segs = segments_of(p, seg)
                pw = compute_view(p)
                g = prepared_grad(g, opts.grad_scale, m.dtype)
                wd = masked_weight_decay(weight_decay, mask)
                if variant == WARM_UP:
                    coeff, update = warm_up_coeff(pw, g, m, v, cf, wd, segs, mp, beta1, beta2)
                else:
                    coeff, update = compressed_coeff(
                        pw, g, m, v, fresh, cf, last, sc, we, se, wd, pad, segs, mp, beta1, beta2
                    )
                leaf_lr = lr if is_static(mult, 1) else lr * mult
                pw.sub_(update * segs.spread(coeff) * leaf_lr)
                finish_param(p, pw, copy)

        return apply

    apply = with_schedule(
        {name: run(name) for name in (WARM_UP, FIRST, COMPRESSED)},
        WARM_UP,
        {WARM_UP: 0, FIRST: 1, COMPRESSED: 1},
        lambda k: WARM_UP if k <= frozen_after else FIRST if k == frozen_after + 1 else COMPRESSED,
    )
    return Optimizer(name="onebitlamb", lr=float(lr), hyperparams=hyper, init_fn=init, apply_fn=apply)
