"""Fused Triton kernels for the flat-shard updates: AdamW/Adam in one pass, LAMB in two.

Each kernel reads every input element once and writes every output once: AdamW reads
``g, p, m, v`` and writes ``p, m, v`` (28 bytes per fp32 element), plus an optional low-precision
copy of the new ``p`` in the same pass. Step-varying scalars (lr, grad scale, betas, bias
corrections, LAMB's trust ratio) travel in a small fp32 device tensor rather than as kernel
arguments, so nothing syncs with the host and a compiled caller never recompiles when they change.

triton is an optional dependency: this module imports without it, and ``available()`` says whether
the kernels can run. Tests run the kernels on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves every optimizer
    triton = None
    tl = None

BLOCK = 1024


# Decided once at import (a plain constant, which torch.compile reads without tracing a cache).
_AVAILABLE = triton is not None and os.environ.get("ZEROSTEP_TRITON", "1") != "0"


def available() -> bool:
    """Whether the kernels can run: triton imports and ZEROSTEP_TRITON is not 0."""
    return _AVAILABLE


def usable(use_triton: bool | None, tensors: tuple[torch.Tensor, ...], statics: tuple = ()) -> bool:
    """Whether a leaf can take the fused path: contiguous, equal shapes, fp32 state, per-leaf options
    (weight decay mask, lr multiplier) plain numbers rather than tensors, and CUDA tensors unless
    ``use_triton`` is True (which forces the kernels on any device: CPU runs need TRITON_INTERPRET=1)."""
    p, *rest = tensors
    if use_triton is False or not _AVAILABLE or (use_triton is None and not p.is_cuda):
        return False
    return (
        (p.is_cuda or use_triton is True)
        and all(t.is_contiguous() and t.shape == p.shape for t in tensors)
        and all(t.dtype == torch.float32 for t in rest[1:])
        and not any(isinstance(s, torch.Tensor) for s in statics)
    )


def _scalars(values, device: torch.device) -> torch.Tensor:
    """Stack python floats and 0-d tensors into one fp32 tensor on ``device`` (no host sync)."""
    return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in values])


def adam_scalars(lr, grad_scale, beta1, beta2, bc1, bc2, device: torch.device) -> torch.Tensor:
    """[lr, grad_scale, beta1, 1 - beta1, beta2, 1 - beta2, bc1, bc2] as fp32 on ``device``.

    ``1 - beta`` is formed before the cast: from an fp32 0.999, ``1 - beta2`` is off by 5e-5.
    ``bc2`` is sqrt(1 - beta2^t) for Adam and 1 - beta2^t for LAMB.
    """
    scale = 1.0 if grad_scale is None else grad_scale
    return _scalars([lr, scale, beta1, 1 - beta1, beta2, 1 - beta2, bc1, bc2], device)


if triton is not None:

    @triton.jit
    def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, scalars_ptr, n, eps, weight_decay,
                     ADAM_W_MODE: tl.constexpr, HAS_OUT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        # int64 offsets: flat shards can exceed 2^31 elements.
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        lr = tl.load(scalars_ptr + 0)
        grad_scale = tl.load(scalars_ptr + 1)
        one_minus_beta1 = tl.load(scalars_ptr + 3)
        beta2 = tl.load(scalars_ptr + 4)
        one_minus_beta2 = tl.load(scalars_ptr + 5)
        bc1 = tl.load(scalars_ptr + 6)
        bc2_sqrt = tl.load(scalars_ptr + 7)
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * grad_scale
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        if ADAM_W_MODE:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + p * weight_decay
        m = m + one_minus_beta1 * (g - m)  # torch's lerp
        v = v * beta2 + one_minus_beta2 * g * g
        denom = tl.sqrt(v) / bc2_sqrt + eps
        p = p - (lr / bc1) * (m / denom)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_OUT:
            tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _lamb_update_kernel(p_ptr, g_ptr, m_ptr, v_ptr, partials_ptr, scalars_ptr, n, eps, weight_decay,
                            EPS_INSIDE_SQRT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        # Pass 1: moments in place, and this block's partial sums of p^2 and update^2.
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        grad_scale = tl.load(scalars_ptr + 1)
        beta1 = tl.load(scalars_ptr + 2)
        one_minus_beta1 = tl.load(scalars_ptr + 3)
        beta2 = tl.load(scalars_ptr + 4)
        one_minus_beta2 = tl.load(scalars_ptr + 5)
        bc1 = tl.load(scalars_ptr + 6)
        bc2 = tl.load(scalars_ptr + 7)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_scale
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * g * g
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if EPS_INSIDE_SQRT:
            denom = tl.sqrt(v / bc2 + eps)
        else:
            denom = tl.sqrt(v / bc2) + eps
        u = (m / bc1) / denom + weight_decay * p
        u = tl.where(mask, u, 0.0)
        tl.store(partials_ptr + 2 * pid, tl.sum(p * p, axis=0))
        tl.store(partials_ptr + 2 * pid + 1, tl.sum(u * u, axis=0))

    @triton.jit
    def _lamb_apply_kernel(p_ptr, m_ptr, v_ptr, out_ptr, scalars_ptr, n, eps, weight_decay,
                           EPS_INSIDE_SQRT: tl.constexpr, HAS_OUT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        # Pass 2: recompute the update from the stored moments and apply lr * trust_ratio * update.
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        lr = tl.load(scalars_ptr + 0)
        bc1 = tl.load(scalars_ptr + 6)
        bc2 = tl.load(scalars_ptr + 7)
        ratio = tl.load(scalars_ptr + 8)
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        if EPS_INSIDE_SQRT:
            denom = tl.sqrt(v / bc2 + eps)
        else:
            denom = tl.sqrt(v / bc2) + eps
        u = (m / bc1) / denom + weight_decay * p
        p = p - lr * ratio * u
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        if HAS_OUT:
            tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def adam_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, scalars: torch.Tensor, *,
               eps: float, weight_decay: float, adam_w_mode: bool, out: torch.Tensor | None = None) -> None:
    """One Adam/AdamW step over contiguous tensors in place; ``scalars`` from ``adam_scalars``.

    ``p`` may be fp32 or low precision (math is fp32); ``m, v`` are fp32; ``out`` (any float dtype,
    same shape) receives the updated params in the same pass.
    """
    n = p.numel()
    if n == 0:
        return
    _adam_kernel[_grid(n)](p, g, m, v, p if out is None else out, scalars, n, eps, weight_decay,
                           ADAM_W_MODE=adam_w_mode, HAS_OUT=out is not None, BLOCK_SIZE=BLOCK)


def lamb_update_norms_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                       scalars: torch.Tensor, *, eps: float, weight_decay: float,
                       eps_inside_sqrt: bool) -> torch.Tensor:
    """LAMB pass 1: update ``m, v`` in place; return [sum(p^2), sum(update^2)] (fp32, shape (2,)).

    The sums are per-block partials reduced by torch afterwards: deterministic, no atomics.
    """
    n = p.numel()
    nblocks = triton.cdiv(n, BLOCK) if n else 0
    partials = torch.empty((max(nblocks, 1), 2), dtype=torch.float32, device=p.device)
    if n == 0:
        return partials.zero_().sum(0)
    _lamb_update_kernel[(nblocks,)](p, g, m, v, partials, scalars, n, eps, weight_decay,
                                    EPS_INSIDE_SQRT=eps_inside_sqrt, BLOCK_SIZE=BLOCK)
    return partials.sum(0)


def lamb_apply_(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, scalars: torch.Tensor, *, eps: float,
                weight_decay: float, eps_inside_sqrt: bool, out: torch.Tensor | None = None) -> None:
    """LAMB pass 2: ``p -= lr * trust_ratio * update``; ``scalars[8]`` holds the trust ratio."""
    n = p.numel()
    if n == 0:
        return
    _lamb_apply_kernel[_grid(n)](p, m, v, p if out is None else out, scalars, n, eps, weight_decay,
                                 EPS_INSIDE_SQRT=eps_inside_sqrt, HAS_OUT=out is not None, BLOCK_SIZE=BLOCK)
