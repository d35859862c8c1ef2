"""1-bit compressed all-reduce with worker and server error feedback (1-bit Adam's two-phase scheme).

Tang et al. 2021 (1-bit Adam), as DeepSpeed's ``NcclBackend.compressed_allreduce`` runs it, over ``W``
ranks and a buffer padded (zeros) to ``T = compressed_numel(n, W)`` elements, split in ``W`` chunks of
``C = T / W``:

1. worker: ``x = m + e_w``; ``s = ||x|| / sqrt(T)``; ``e_w <- x - s * sign(x)`` (sign(0) = +1);
   send ``sign(x)`` as bits, chunk ``r`` to rank ``r`` (all-to-all), and ``s`` to all (all-gather);
2. server (rank ``r``, chunk ``r``): ``y = sum_k s_k / W * sign_k[r] + e_s``; ``t = ||y|| / sqrt(C)``;
   ``e_s <- y - t * sign(y)``; all-gather ``sign(y)`` as bits and ``t``;
3. every rank: ``out[k-th chunk] = t_k * sign(y_k)``: the compressed average of the ranks' ``m``.

Signs travel packed 8 per byte (``pack_signs``: a Triton kernel on CUDA, torch ops on CPU), so the
wire carries ``T / 8`` bytes each way plus one fp32 scale per rank, about 1/32 of an fp32 all-reduce.
The collectives are the process group's own (``all_to_all_single``, ``all_gather_single``: gloo on
CPU, NCCL on GPU); the shared-memory channel of ``parallel.shm`` has no all-to-all, so over it the
exchange still goes through the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from zerostep.parallel import sign_kernels
from zerostep.parallel.collectives import ALL_GATHER, CommOp, CommPlan

ALL_TO_ALL = "all_to_all"  # the CommOp kind: this rank's sent bytes

# bit weights of one packed byte, most significant first (numpy's packbits order)
_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def compressed_numel(numel: int, world_size: int) -> int:
    """``numel`` padded up to a multiple of ``W * lcm(W, 8)`` (DeepSpeed's divider): every rank's chunk
    is a whole number of bytes once packed."""
    unit = world_size * math.lcm(world_size, 8)
    return -(-numel // unit) * unit


def signs_of(x: torch.Tensor) -> torch.Tensor:
    """+1 where ``x >= 0``, else -1 (DeepSpeed's sign: zero counts as positive), in ``x``'s dtype."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """uint8 [numel / 8]: bit ``7 - j`` of byte ``i`` is set where ``x[8 i + j] >= 0`` (a Triton kernel
    on CUDA, ``parallel.sign_kernels``; torch ops elsewhere)."""
    if x.numel() % 8:
        raise ValueError(f"pack_signs: {x.numel()} elements is not a multiple of 8")
    if sign_kernels.usable(x):
        return sign_kernels.pack_signs(x)
    return pack_signs_torch(x)


def pack_signs_torch(x: torch.Tensor) -> torch.Tensor:
    """``pack_signs`` in torch ops."""
    bits = (x.reshape(-1, 8) >= 0).to(torch.uint8)  # [numel / 8, 8]
    return (bits << _BIT_SHIFTS.to(x.device)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The +1/-1 values [packed.numel() * 8] that ``pack_signs`` packed."""
    if sign_kernels.usable(packed):
        return sign_kernels.unpack_signs(packed, dtype)
    return unpack_signs_torch(packed, dtype)


def unpack_signs_torch(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``unpack_signs`` in torch ops."""
    bits = (packed.reshape(-1, 1) >> _BIT_SHIFTS.to(packed.device)) & 1  # [numel / 8, 8]
    return bits.reshape(-1).to(dtype) * 2 - 1


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    # torch 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there); looked up per
    # call so a benchmark's byte counter can wrap either
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp, group=group)


def _scale(x: torch.Tensor) -> torch.Tensor:
    """One fp32 scale for a whole buffer: its RMS, so ``scale * sign(x)`` keeps ``x``'s l2 norm."""
    return (torch.linalg.vector_norm(x) / math.sqrt(x.numel())).reshape(1)


@dataclass
class WireBytes:
    """Bytes of the tensors this rank hands to the collectives (sends for all-to-all, the gathered
    output for all-gather, as ``collectives``' byte accounting counts them)."""

    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


def error_buffers(numel: int, world_size: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (worker error [W, C], server error [1, C]) for a buffer of ``numel`` elements. Both are 2-D
    so no checkpoint mistakes them for flat, shardable leaves: they are this rank's own."""
    if world_size <= 1:
        return torch.zeros(0, 0, device=device), torch.zeros(0, 0, device=device)
    total = compressed_numel(numel, world_size)
    chunk = total // world_size
    return torch.zeros(world_size, chunk, device=device), torch.zeros(1, chunk, device=device)


def compressed_allreduce(
    buffer: torch.Tensor,
    worker_error: torch.Tensor,
    server_error: torch.Tensor,
    group: Any = None,
    wire: WireBytes | None = None,
) -> torch.Tensor:
    """The compressed average over the group's ranks of ``buffer`` (1-D fp32 [n]), a new tensor [n].

    ``worker_error`` [W, C] and ``server_error`` [1, C] (``error_buffers``) are updated in place."""
    world = dist.get_world_size(group)
    n = buffer.numel()
    total = worker_error.numel()
    chunk = total // world
    if worker_error.shape != (world, chunk) or server_error.shape != (1, chunk) or total < n:
        raise ValueError(
            f"compressed_allreduce: error buffers {list(worker_error.shape)} / {list(server_error.shape)} "
            f"do not fit a buffer of {n} elements over {world} ranks "
            f"(want {list(error_buffers(n, world)[0].shape)})"
        )
    x = torch.cat([buffer.reshape(-1).float(), buffer.new_zeros(total - n, dtype=torch.float32)])
    x.add_(worker_error.reshape(-1))
    scale = _scale(x)
    worker_error.copy_((x - scale * signs_of(x)).reshape(world, chunk))

    # phase 1: rank r receives every rank's chunk r of the signs, and every rank's scale
    send = pack_signs(x).reshape(world, chunk // 8)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    scales = scale.new_empty(world)
    _all_gather(scales, scale, group=group)

    # phase 2: the server average of chunk r, its error feedback, its own compression
    server = (unpack_signs(recv).reshape(world, chunk) * (scales / world).reshape(world, 1)).sum(0)
    server.add_(server_error.reshape(-1))
    server_scale = _scale(server)
    server_error.copy_((server - server_scale * signs_of(server)).reshape(1, chunk))
    server_packed = pack_signs(server)
    gathered = server_packed.new_empty(world * server_packed.numel())
    _all_gather(gathered, server_packed, group=group)
    server_scales = scales.new_empty(world)
    _all_gather(server_scales, server_scale, group=group)
    if wire is not None:
        wire.add(ALL_TO_ALL, send.numel())
        wire.add(ALL_GATHER, scales.numel() * 4 + gathered.numel() + server_scales.numel() * 4)

    out = unpack_signs(gathered).reshape(world, chunk) * server_scales.reshape(world, 1)
    return out.reshape(-1)[:n].to(buffer.dtype)


def compressed_allreduce_plan(numel: int, world_size: int) -> CommPlan:
    """The bytes ``compressed_allreduce`` of ``numel`` elements moves (``WireBytes``' counting)."""
    if world_size <= 1:
        return CommPlan()
    total = compressed_numel(numel, world_size)
    return CommPlan(
        (
            CommOp(ALL_TO_ALL, total // 8),
            CommOp(ALL_GATHER, total // 8 + 8 * world_size, calls=3),
        )
    )
