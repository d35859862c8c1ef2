"""Flat-buffer layouts: many named tensors of one dtype packed into one 1-D buffer, padded to shard evenly.

A ``FlatLayout`` is the sharding plan ZeRO works over. For ``world_size`` ranks the buffer has
``padded_numel = ceil(numel / world_size) * world_size`` elements (at least ``world_size``), rank ``r``
owns ``[r * shard_numel, (r + 1) * shard_numel)``, and the padding at the end is zero and never read back
into a parameter. Layouts are plain frozen data: hashable, so they can sit in pytree metadata and in
``torch.compile`` guards without recompiling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlatEntry:
    name: str
    shape: tuple[int, ...]
    offset: int  # first element in the flat buffer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FlatLayout:
    entries: tuple[FlatEntry, ...]
    dtype: torch.dtype
    world_size: int = 1

    @staticmethod
    def build(
        shapes: Sequence[tuple[str, Sequence[int]]], dtype: torch.dtype, world_size: int = 1
    ) -> FlatLayout:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        entries, offset = [], 0
        for name, shape in shapes:
            entry = FlatEntry(name, tuple(int(s) for s in shape), offset)
            entries.append(entry)
            offset += entry.numel
        return FlatLayout(tuple(entries), dtype, world_size)

    @staticmethod
    def of(tensors: Mapping[str, torch.Tensor], world_size: int = 1, dtype: torch.dtype | None = None):
        if not tensors:
            raise ValueError("cannot build a flat layout of no tensors")
        dtype = dtype or next(iter(tensors.values())).dtype
        return FlatLayout.build([(n, tuple(t.shape)) for n, t in tensors.items()], dtype, world_size)

    def with_world_size(self, world_size: int) -> FlatLayout:
        return FlatLayout(self.entries, self.dtype, world_size)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def shard_numel(self) -> int:
        return max(1, -(-self.numel // self.world_size))

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.world_size

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

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` ([numel] or [padded_numel]) shaped like each entry, in layout order.

        Uses ``torch.split`` so that autograd's backward of the views is one ``cat`` (one flat gradient)
        instead of a scatter per tensor.
        """
        sizes = [e.numel for e in self.entries]
        rest = flat.numel() - self.numel
        if rest < 0:
            raise ValueError(f"flat buffer has {flat.numel()} elements, layout needs {self.numel}")
        pieces = torch.split(flat, sizes + [rest])[: len(sizes)]
        return [p.view(e.shape) for p, e in zip(pieces, self.entries)]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> view of ``flat``; no copy."""
        return dict(zip(self.names, self.split(flat)))

    def shard(self, flat: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's slice [shard_numel] of a full padded buffer (a view)."""
        start, end = self.shard_range(rank)
        return flat[start:end]
