"""DeepSpeed's ``deepspeed.sequence`` (Ulysses sequence parallelism) over ``zerostep.parallel.ulysses``:
``layer.DistributedAttention``, ``cross_entropy.vocab_sequence_parallel_cross_entropy``, and
``split_sequence`` to cut a batch to this rank's part of every sequence."""

from __future__ import annotations

from typing import Any

from zerostep.parallel import ulysses
from zerostep.sequence import cross_entropy, layer
from zerostep.sequence.cross_entropy import vocab_sequence_parallel_cross_entropy
from zerostep.sequence.layer import DistributedAttention


def split_sequence(batch: Any, sequence_parallel_size: int | None = None, dim: int = 1) -> Any:
    """``batch`` (a pytree of ``[B, T, ...]`` tensors) cut to this rank's ``T / P`` positions.

    ``sequence_parallel_size``: the groups' size (created on first use, collectively); ``None`` takes the
    groups made last (by the model or the engine), or none at all (one rank keeps the whole batch)."""
    if sequence_parallel_size is None:
        groups = ulysses.current_sequence_groups()
        if groups is None:
            return batch
    else:
        groups = ulysses.initialize_sequence_parallel(sequence_parallel_size)
    return ulysses.split_sequence(batch, groups, dim)


__all__ = [
    "DistributedAttention",
    "cross_entropy",
    "layer",
    "split_sequence",
    "vocab_sequence_parallel_cross_entropy",
]
