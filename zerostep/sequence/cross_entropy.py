"""DeepSpeed's ``deepspeed.sequence.cross_entropy.vocab_sequence_parallel_cross_entropy``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from zerostep.parallel import ulysses


def vocab_sequence_parallel_cross_entropy(
    vocab_seq_parallel_logits: torch.Tensor, target: torch.Tensor, sp_group: Any
) -> torch.Tensor:
    """Per-token losses of the whole sequence, ``[T, B]``, from this rank's logits ``[T/P, B, V]`` and
    targets ``[T/P, B]``: every rank gets every position's loss, and the gradient reaches only this
    rank's logits (``ulysses.gather_sequence``), so a mean of the result is the whole sequence's mean
    loss on every rank, whose gradient the engine sums over the sequence-parallel group."""
    t, b, v = vocab_seq_parallel_logits.shape
    if tuple(target.shape) != (t, b):
        raise ValueError(f"target must be [T/P, B] = {(t, b)}, got {tuple(target.shape)}")
    local = F.cross_entropy(
        vocab_seq_parallel_logits.reshape(t * b, v).float(), target.reshape(t * b), reduction="none"
    )
    return ulysses.gather_sequence(local.reshape(t, b), sp_group, dim=0)


__all__ = ["vocab_sequence_parallel_cross_entropy"]
