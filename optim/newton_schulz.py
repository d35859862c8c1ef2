"""Newton-Schulz orthogonalization (Jordan et al. 2024, "Muon"), the standard quintic and the Gram form.

Both map a matrix ``G = U S V^T`` to roughly ``U S' V^T`` with ``S'`` near 1 (the quintic's coefficients
(3.4445, -4.7750, 2.0315) maximize the slope at zero rather than converge exactly). Leading dimensions
are batch dimensions. The input is normalized by its Frobenius norm (plus 1e-7, as DeepSpeed does) and
worked on in the wide orientation (rows <= columns).

The Gram form (DeepSpeed's default ``ns_method="gram"``, after Dao's "Gram Newton-Schulz") iterates on
the small square ``R = X X^T`` instead of ``X``: each step ``X <- (aI + bR + cR^2) X`` is accumulated
into ``Q`` and ``R <- P R P`` with ``P = aI + bR + cR^2``, restarting once (``X <- Q X``) after two steps
to keep half precision stable. It is the same map in exact arithmetic, cheaper when columns >> rows.

``dtype`` is the working precision. DeepSpeed works in bf16 (standard) or fp16 (Gram) where the device
supports them and fp32 otherwise; ``auto_dtype`` reproduces that choice.
"""

from __future__ import annotations

import torch

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_METHODS = ("gram", "standard")
_RESTART_AT = 2


def auto_dtype(method: str, device: torch.device) -> torch.dtype:
    """DeepSpeed's working precision for ``method`` on ``device``'s accelerator."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if method == "standard":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.float16 if major >= 7 else torch.float32
    if method == "standard":
        return torch.bfloat16  # DeepSpeed's CPU accelerator reports bf16 support
    try:
        return torch.float16 if torch.ops.mkldnn._is_mkldnn_fp16_supported() else torch.float32
    except (AttributeError, RuntimeError):
        return torch.float32


def _mm_add(bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, beta: float, alpha: float = 1.0):
    """``beta * bias + alpha * (x @ y)`` in one fused matmul (2-D or batched 3-D)."""
    if x.dim() == 2:
        return torch.addmm(bias, x, y, beta=beta, alpha=alpha)
    return torch.baddbmm(bias, x, y, beta=beta, alpha=alpha)


def newton_schulz(g: torch.Tensor, steps: int = 5, method: str = "gram", dtype: torch.dtype | None = None):
    """The orthogonalized ``g`` ([..., rows, cols], 2+ dims), in ``dtype`` (default: ``g``'s)."""
    if g.dim() < 2:
        raise ValueError(f"Newton-Schulz needs a matrix (2+ dims), got shape {tuple(g.shape)}")
    if method not in NS_METHODS:
        raise ValueError(f"ns_method {method!r} is not one of {list(NS_METHODS)}")
    batch_shape = g.shape[:-2]
    x = g.to(dtype or g.dtype)
    if x.dim() > 3:
        x = x.reshape(-1, *x.shape[-2:])  # baddbmm takes one batch dimension
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)
    rows, cols = x.size(-2), x.size(-1)
    if method == "standard" or cols <= rows:
        x = _standard(x, steps)
    else:
        x = _gram(x, steps)
    if tall:
        x = x.mT
    return x.reshape(*batch_shape, *x.shape[-2:])


def _standard(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        poly = _mm_add(gram, gram, gram, beta=b, alpha=c)  # b R + c R^2
        x = _mm_add(x, poly, x, beta=a)  # a X + (b R + c R^2) X
    return x


def _gram(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = COEFFICIENTS
    r = x @ x.mT  # [.., rows, rows]
    q = None  # the product of the steps' polynomials in R since the last restart
    eye = torch.eye(r.size(-1), dtype=r.dtype, device=r.device)
    for i in range(steps):
        if i == _RESTART_AT and q is not None:
            x = q @ x
            r = x @ x.mT
            q = None
        z = _mm_add(r, r, r, beta=b, alpha=c)  # b R + c R^2
        q = z + a * eye if q is None else _mm_add(q, z, q, beta=a)  # (aI + Z) Q
        if i < steps - 1 and i + 1 != _RESTART_AT:
            rz = _mm_add(r, z, r, beta=a)  # (aI + Z) R
            r = _mm_add(rz, z, rz, beta=a)  # (aI + Z)^2 R
    return x if q is None else q @ x
