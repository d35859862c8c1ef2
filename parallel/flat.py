"""Flat-buffer layouts: many named tensors of one dtype packed into one 1-D buffer, padded to shard evenly.

A ``FlatLayout`` is the sharding plan ZeRO works over. Entries start on multiples of ``align`` elements
(``ALIGN_ELEMENTS`` = 16 by default: 16 bytes or more in every dtype, so the fp32 master, the compute-dtype
parameters and the gradients that share one layout's offsets all get views that start on 16-byte
boundaries, as cuBLAS, Triton's vectorized loads and NCCL want them). The same layout in any dtype and at
any world size puts every entry at the same offset, so a checkpoint maps entries across both.

    buffer  |e0.......|gap|e1....|gap|e2..|tail padding ............|
            0         ^ multiples of align                ^ extent  ^ padded_numel

For ``world_size`` ranks the buffer has ``padded_numel = world_size * shard_numel`` elements, where
``shard_numel`` is ``ceil(extent / world_size)`` rounded up to a multiple of ``align`` (at least
``align``), so every rank's shard starts aligned too. Rank ``r`` owns ``[r * shard_numel, (r + 1) *
shard_numel)``. The gaps and the tail (``padding()``) are zero and never read back into a parameter.
Layouts are plain frozen data: hashable, so they can sit in pytree metadata and in ``torch.compile``
guards without recompiling. ``align=1`` gives the packing of zerostep before alignment (entries back to
back, shards of ``ceil(numel / world_size)``), which old checkpoints were written with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

ALIGN_BYTES = 16
# Elements, not bytes, so that one layout is aligned in every dtype it is used with (1-byte and up).
ALIGN_ELEMENTS = ALIGN_BYTES


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class FlatEntry:
    name: str
    shape: tuple[int, ...]
    offset: int  # first element in the flat buffer (a multiple of the layout's align)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class FlatLayout:
    entries: tuple[FlatEntry, ...]
    dtype: torch.dtype
    world_size: int = 1
    align: int = ALIGN_ELEMENTS  # entry offsets and shard sizes are multiples of this many elements

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.align < 1:
            raise ValueError(f"align must be >= 1 elements, got {self.align}")

    @staticmethod
    def build(
        shapes: Sequence[tuple[str, Sequence[int]]],
        dtype: torch.dtype,
        world_size: int = 1,
        align: int | None = None,
    ) -> FlatLayout:
        """Entries in the given order, each at the first multiple of ``align`` (default
        ``ALIGN_ELEMENTS``) after the previous one."""
        align = ALIGN_ELEMENTS if align is None else align
        if align < 1:
            raise ValueError(f"align must be >= 1 elements, got {align}")
        entries, offset = [], 0
        for name, shape in shapes:
            entry = FlatEntry(name, tuple(int(s) for s in shape), _round_up(offset, align))
            entries.append(entry)
            offset = entry.end
        return FlatLayout(tuple(entries), dtype, world_size, align)

    @staticmethod
    def of(
        tensors: Mapping[str, torch.Tensor],
        world_size: int = 1,
        dtype: torch.dtype | None = None,
        align: int | None = None,
    ) -> FlatLayout:
        if not tensors:
            raise ValueError("cannot build a flat layout of no tensors")
        dtype = dtype or next(iter(tensors.values())).dtype
        return FlatLayout.build([(n, tuple(t.shape)) for n, t in tensors.items()], dtype, world_size, align)

    def with_world_size(self, world_size: int) -> FlatLayout:
        return FlatLayout(self.entries, self.dtype, world_size, self.align)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    @property
    def numel(self) -> int:
        """Elements that belong to entries (the parameter count), gaps and padding not counted."""
        return sum(e.numel for e in self.entries)

    @property
    def extent(self) -> int:
        """Elements up to the end of the last entry: the part of the buffer a checkpoint must keep."""
        return self.entries[-1].end if self.entries else 0

    @property
    def shard_numel(self) -> int:
        return _round_up(max(1, -(-self.extent // self.world_size)), self.align)

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.world_size

    def padding(self) -> tuple[tuple[int, int], ...]:
        """The ``[start, stop)`` ranges of ``[0, padded_numel)`` no entry covers (gaps, then the tail)."""
        out, at = [], 0
        for e in self.entries:
            if e.offset > at:
                out.append((at, e.offset))
            at = max(at, e.end)
        if at < self.padded_numel:
            out.append((at, self.padded_numel))
        return tuple(out)

    def shard_range(self, rank: int) -> tuple[int, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    def flatten(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Pack ``tensors`` (keyed by this layout's names) into a new zero-padded buffer [padded_numel]."""
        missing = [e.name for e in self.entries if e.name not in tensors]
        if missing:
            raise KeyError(f"tensors missing from flat layout input: {missing}")
        first = tensors[self.entries[0].name] if self.entries else None
        device = first.device if first is not None else None
        flat = torch.zeros(self.padded_numel, dtype=dtype or self.dtype, device=device)
        for e, view in zip(self.entries, self.split(flat)):
            t = tensors[e.name]
            if tuple(t.shape) != e.shape:
                raise ValueError(f"{e.name}: shape {tuple(t.shape)} does not match layout shape {e.shape}")
            view.copy_(t.reshape(e.shape))
        return flat

    def _pieces(self, total: int) -> tuple[list[int], list[int]]:
        """Split sizes cutting [total] into entries and the padding between them, and which are entries."""
        sizes, which, at = [], [], 0
        for e in self.entries:
            if e.offset > at:
                sizes.append(e.offset - at)
            which.append(len(sizes))
            sizes.append(e.numel)
            at = e.end
        sizes.append(total - at)
        return sizes, which

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` ([extent] or longer, e.g. [padded_numel]) shaped like each entry, in order.

        Uses ``torch.split`` so that autograd's backward of the views is one ``cat`` (one flat gradient,
        zero over the padding) instead of a scatter per tensor.
        """
        if flat.numel() < self.extent:
            raise ValueError(f"flat buffer has {flat.numel()} elements, layout needs {self.extent}")
        sizes, which = self._pieces(flat.numel())
        pieces = torch.split(flat, sizes)
        return [pieces[i].view(e.shape) for i, e in zip(which, self.entries)]

    def concat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """One tensor per entry, in layout order -> a new flat buffer [padded_numel], zero over the padding
        (the inverse of ``split``; one ``cat``, which ``torch.compile`` fuses into its consumer)."""
        if len(tensors) != len(self.entries):
            raise ValueError(f"{len(tensors)} tensors for a layout of {len(self.entries)} entries")
        sizes, which = self._pieces(self.padded_numel)
        like = tensors[0] if tensors else torch.empty(0, dtype=self.dtype)
        parts: list[torch.Tensor | None] = [like.new_zeros(n) if n else None for n in sizes]
        for i, t in zip(which, tensors):
            parts[i] = t.reshape(-1)
        return torch.cat([p for p in parts if p is not None])

    def zero_padding(self, flat: torch.Tensor) -> torch.Tensor:
        """Zero ``flat``'s [padded_numel] padding in place (gaps and tail); returns ``flat``."""
        for start, stop in self.padding():
            flat[start:stop].zero_()
        return flat

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> view of ``flat``; no copy."""
        return dict(zip(self.names, self.split(flat)))

    def shard(self, flat: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's slice [shard_numel] of a full padded buffer (a view)."""
        start, end = self.shard_range(rank)
        return flat[start:end]
