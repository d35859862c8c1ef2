"""Weight-only int8 for ``nn.Linear``: per-output-channel symmetric scales, dequantized in the forward.

``W [out, in]`` becomes ``q = round(W / s)`` in int8 with ``s[o] = max_i |W[o, i]| / 127`` (one fp32 scale
per output row). Because ``s`` is per output channel it factors out of the matmul:
``x @ W.T ~= (x @ q.T) * s``, so the forward casts ``q`` to the activations' dtype (exact: |q| <= 127 is
representable in fp16 and bf16), multiplies, and scales the output; under ``torch.compile`` the cast fuses
into the matmul's input. Activations stay floating point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [out, in], scale fp32 [out])`` with ``weight ~= q * scale[:, None]``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0  # [out]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """An ``nn.Linear`` whose weight is int8 with per-output-channel scales (buffers, not parameters)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("weight_int8", q.to(linear.weight.device))
        self.register_buffer("weight_scale", scale.to(linear.weight.device))
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight_int8.to(x.dtype))  # [..., out]
        y = y * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` (in place) with an ``Int8Linear``; returns how many.
    A weight tied to an embedding stays floating point in the embedding; the head gets the int8 copy."""
    targets = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]
    if isinstance(module, nn.Linear):
        raise TypeError("quantize_linears: pass the model that holds the nn.Linear, not the Linear itself")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, Int8Linear(linear))
    return len(targets)
