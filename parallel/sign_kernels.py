"""Triton kernels packing signs 8 per byte and unpacking them: ``parallel.compressed``'s GPU path.

Same bit order as the torch-ops packer there (numpy's packbits: element ``8 i + j`` is bit ``7 - j`` of
byte ``i``, set where ``x >= 0``). One pass each way: packing reads ``numel`` fp32 and writes
``numel / 8`` bytes, where the torch ops materialise a uint8 [numel / 8, 8] bit tile and shift it (three
passes over 1 byte per element); unpacking writes the ±1 values directly.

triton is optional: this module imports without it, and ``available()`` says whether the kernels can
run. On CPU the torch ops serve (tests run these kernels on CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

BLOCK_BYTES = 512  # packed bytes per program (4096 elements)

_AVAILABLE = triton is not None and os.environ.get("ZEROSTEP_TRITON", "1") != "0"


def available() -> bool:
    """Whether the kernels can run: triton imports and ZEROSTEP_TRITON is not 0."""
    return _AVAILABLE


def usable(x: torch.Tensor) -> bool:
    """Whether ``parallel.compressed`` packs ``x`` here: CUDA tensors when triton runs (CPU tensors
    keep the torch ops; tests call the kernels on CPU directly, under the interpreter)."""
    return _AVAILABLE and x.is_cuda


if triton is not None:

    @triton.jit
    def _pack_kernel(x_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr):
        byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
        bit = tl.arange(0, 8)  # [8], most significant first
        idx = byte[:, None] * 8 + bit[None, :]  # [BLOCK, 8]
        mask = byte[:, None] < n_bytes
        x = tl.load(x_ptr + idx, mask=mask, other=0.0)
        bits = (x >= 0).to(tl.int32) << (7 - bit[None, :])
        tl.store(out_ptr + byte, tl.sum(bits, axis=1).to(tl.uint8), mask=byte < n_bytes)

    @triton.jit
    def _unpack_kernel(packed_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr):
        byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        bit = tl.arange(0, 8)
        packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
        bits = (packed[:, None] >> (7 - bit[None, :])) & 1  # [BLOCK, 8]
        idx = byte[:, None] * 8 + bit[None, :]
        values = (bits * 2 - 1).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + idx, values, mask=byte[:, None] < n_bytes)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """uint8 [numel / 8] (``x``: contiguous, numel a multiple of 8)."""
    x = x.reshape(-1).contiguous()
    n_bytes = x.numel() // 8
    out = torch.empty(n_bytes, dtype=torch.uint8, device=x.device)
    if n_bytes:
        _pack_kernel[(triton.cdiv(n_bytes, BLOCK_BYTES),)](x, out, n_bytes, BLOCK=BLOCK_BYTES)
    return out


def unpack_signs(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ±1 values [packed.numel() * 8] in ``dtype``."""
    packed = packed.reshape(-1).contiguous()
    out = torch.empty(packed.numel() * 8, dtype=dtype, device=packed.device)
    if packed.numel():
        _unpack_kernel[(triton.cdiv(packed.numel(), BLOCK_BYTES),)](
            packed, out, packed.numel(), BLOCK=BLOCK_BYTES
        )
    return out
