"""Weight-only int8 for ``nn.Linear``, Hugging Face's ``Conv1D`` and tensor-parallel ``ParallelLinear``
shards: per-output-channel symmetric scales, dequantized in the forward.

``W [out, in]`` becomes ``q = round(W / s)`` in int8 with ``s[o] = max_i |W[o, i]| / 127`` (one fp32 scale
per output row). Because ``s`` is per output channel it factors out of the matmul:
``x @ W.T ~= (x @ q.T) * s``, so the forward casts ``q`` to the activations' dtype (exact: |q| <= 127 is
representable in fp16 and bf16), multiplies, and scales the output; under ``torch.compile`` the cast fuses
into the matmul's input. Activations stay floating point. A ``Conv1D`` (``W [in, out]``) is quantized
as its transpose, so the int8 weight is always ``[out, in]``.

Under tensor parallelism each rank quantizes its own shard after sharding, per output channel of the
shard: a column-parallel shard holds whole output rows, so its scales are exactly TP=1's for those rows;
a row-parallel shard holds ``in / tp`` of each row, so its scales are the maxima over that slice (never
coarser than TP=1's), and each rank scales its partial product before the all-reduce sums them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zerostep.parallel.tensor_parallel import ParallelLinear


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [out, in], scale fp32 [out])`` with ``weight ~= q * scale[:, None]``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0  # [out]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"  # transformers' GPT-2 projection: weight [in, out]


def _int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [..., in] @ (q * scale[:, None]).T`` -> ``[..., out]``, scaled after the matmul."""
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


class Int8Linear(nn.Module):
    """An ``nn.Linear`` (or ``Conv1D``) whose weight is int8 ``[out, in]`` with per-output-channel scales
    (buffers, not parameters)."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        weight = linear.weight.detach()
        weight = weight.t() if _is_conv1d(linear) else weight  # [out, in]
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_weight(weight)
        self.register_buffer("weight_int8", q.to(weight.device))
        self.register_buffer("weight_scale", scale.to(weight.device))
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _int8_matmul(x, self.weight_int8, self.weight_scale)  # [..., out]
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8ParallelLinear(ParallelLinear):
    """A ``ParallelLinear`` whose shard is int8 ``[out_local or out, in or in_local]`` with per-output-
    channel scales; the collectives around the local product are ``ParallelLinear``'s."""

    def __init__(self, linear: ParallelLinear):
        nn.Module.__init__(self)
        self.style, self.replaced, self._group = linear.style, linear.replaced, linear._group
        self.transposed = False  # the int8 shard is stored [out, in] whatever the original layout
        weight = linear.weight.detach()
        q, scale = quantize_weight(weight.t() if linear.transposed else weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )

    def local_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _int8_matmul(x, self.weight_int8, self.weight_scale)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        return f"{self.replaced}, {self.style}, local int8 weight {list(self.weight_int8.shape)} per-channel"


def _int8_of(m: nn.Module) -> nn.Module | None:
    if isinstance(m, ParallelLinear) and not isinstance(m, Int8ParallelLinear):
        return Int8ParallelLinear(m)
    if type(m) is nn.Linear or _is_conv1d(m):
        return Int8Linear(m)
    return None


def quantize_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear``, ``Conv1D`` and ``ParallelLinear`` shard under ``module`` (in place)
    with its int8 version; returns how many. A weight tied to an embedding stays floating point in the
    embedding; the head gets the int8 copy."""
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        raise TypeError("quantize_linears: pass the model that holds the nn.Linear, not the Linear itself")
    targets = [(name, new) for name, m in module.named_modules() if (new := _int8_of(m)) is not None]
    for name, new in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, new)
    return len(targets)
