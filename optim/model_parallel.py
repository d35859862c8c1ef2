"""What an optimizer whose update is not elementwise needs to know about model parallelism.

Under tensor (model) parallelism a parameter is either *split* over the model-parallel group (each rank
holds a shard: column-/row-parallel weights, a vocab-parallel embedding) or *replicated* (each rank holds
the whole tensor: norms, row-parallel biases). An elementwise update is the same either way; these are not:

- LAMB's and 1-bit LAMB's per-parameter norms (the trust ratio, 1-bit LAMB's momentum RMS and factor
  maxima): a split parameter's norm is the sum of its shards' squared sums over the group, a replicated
  one's is this rank's own (summing it over the group would count it ``tp`` times). ``SplitSegments``
  says, per flat leaf, which parameter segments are split, and carries the group's reductions;
  ``complete_sums`` / ``complete_maxima`` / ``full_sizes`` turn per-shard values into per-parameter ones.
- Muon's Newton-Schulz iteration needs the whole matrix: ``MatrixSplit`` gathers a split matrix's shards
  (any split, a fused qkv's included, as the caller's ``gather`` reassembles it), the optimizer
  orthogonalizes the full matrix (scaled by its full shape) and keeps this rank's shard (``shard``).

The reductions are callables the engine passes in (this package knows nothing of process groups): every
rank of a model-parallel group must call them in the same order, which holds because its ranks hold the
same parameters at the same local shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class SplitSegments(NamedTuple):
    """One flat leaf's parameter segments (in the order the optimizer indexes them) under model
    parallelism: ``split[i]`` says whether segment ``i`` is a shard of a parameter split over the
    group of ``tp_size`` ranks. ``all_reduce``: sum over the group; ``all_gather``: ``[k] -> [tp * k]``
    (rank-major), for maxima."""

    split: tuple[bool, ...]
    tp_size: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor]
    all_gather: Callable[[torch.Tensor], torch.Tensor]

    def mask(self, like: torch.Tensor) -> torch.Tensor:
        """bool [S] on ``like``'s device."""
        return torch.tensor(self.split, dtype=torch.bool, device=like.device)


def complete_sums(sums: torch.Tensor, mp: SplitSegments | None) -> torch.Tensor:
    """Per-segment partial sums ``[..., S]`` -> per-parameter sums: split segments summed over the group,
    replicated ones kept (every rank already holds the whole parameter). One all-reduce."""
    if mp is None or not any(mp.split):
        return sums
    mask = mp.mask(sums)
    reduced = mp.all_reduce(torch.where(mask, sums, torch.zeros_like(sums)).reshape(-1)).reshape(sums.shape)
    return torch.where(mask, reduced, sums)


def complete_maxima(maxima: torch.Tensor, mp: SplitSegments | None) -> torch.Tensor:
    """Per-segment maxima [S] -> per-parameter maxima over the group (replicated segments are equal on
    every rank, so the maximum over the group leaves them as they are). One all-gather."""
    if mp is None or not any(mp.split):
        return maxima
    gathered = mp.all_gather(maxima.reshape(-1).contiguous())  # [tp * S]
    return gathered.view(mp.tp_size, -1).amax(0).reshape(maxima.shape)


def full_sizes(sizes: torch.Tensor, mp: SplitSegments | None) -> torch.Tensor:
    """Per-segment element counts [S] -> the whole parameters' (a split segment times ``tp_size``)."""
    if mp is None or not any(mp.split):
        return sizes
    return torch.where(mp.mask(sizes), sizes * mp.tp_size, sizes)


class MatrixSplit(NamedTuple):
    """A Muon matrix split over the model-parallel group. ``gather``: this rank's shard (its local
    shape) -> the full matrix ``full_shape``, collective over the group; ``shard``: full -> this rank's
    shard (no communication)."""

    full_shape: tuple[int, ...]
    gather: Callable[[torch.Tensor], torch.Tensor]
    shard: Callable[[torch.Tensor], torch.Tensor]
