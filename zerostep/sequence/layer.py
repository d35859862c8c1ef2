"""DeepSpeed's ``deepspeed.sequence.layer.DistributedAttention`` over ``zerostep.parallel.ulysses``.

Both of DeepSpeed's calling conventions work:

- DeepSpeed >= 0.15: ``forward(query, key, value, batch_dim_idx, rotary_pos_emb=None, *args, **kwargs)``.
  ``batch_dim_idx`` 0 means ``[B, T/P, H, D]`` inputs, 1 means ``[T/P, B, H, D]``; heads are dim 2
  (``scatter_idx`` must be 2, DeepSpeed's default) and ``gather_idx`` is not used, as in DeepSpeed.
- DeepSpeed 0.14: ``forward(query, key, value, *args, **kwargs)``, the all-to-all scattering
  ``scatter_idx`` and gathering ``gather_idx`` (defaults 2 and 0: Megatron's ``[T/P, B, H, D]``).

The fourth positional argument (or ``batch_dim_idx=``) selects the first when it is the int 0 or 1 (not a
bool); anything else goes to ``local_attention`` as in 0.14. ``local_attention(q, k, v, *args, **kwargs)``
sees whole sequences of ``H / P`` heads and returns a tensor of their layout.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zerostep.parallel import ulysses


class DistributedAttention(nn.Module):
    """Ulysses attention: all-to-all from the sequence split to the head split, ``local_attention``,
    all-to-all back. ``sequence_process_group``: the sequence-parallel group (``None``: the default
    group, as in DeepSpeed; one process: no exchange)."""

    def __init__(
        self,
        local_attention: nn.Module,
        sequence_process_group: Any,
        scatter_idx: int = 2,
        gather_idx: int = 0,
        sp_stream: Any = None,
    ) -> None:
        super().__init__()
        if scatter_idx == gather_idx:
            raise ValueError(f"scatter_idx and gather_idx must differ, both are {scatter_idx}")
        self.local_attn = local_attention
        if sequence_process_group is None and dist.is_available() and dist.is_initialized():
            sequence_process_group = dist.group.WORLD
        self.spg = sequence_process_group
        self.scatter_idx = scatter_idx
        self.gather_idx = gather_idx
        self.sp_stream = sp_stream
        if sp_stream is not None:
            warnings.warn(
                "DistributedAttention(sp_stream=...) has no effect in zerostep: the all-to-alls run on the "
                "current stream, not overlapped with the q/k/v projections",
                stacklevel=2,
            )

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        batch_dim_idx = kwargs.pop("batch_dim_idx", None)
        if batch_dim_idx is None and args and _is_batch_dim(args[0]):
            batch_dim_idx, args = args[0], args[1:]
        if batch_dim_idx is None:  # DeepSpeed 0.14
            seq_dim, head_dim = self.gather_idx, self.scatter_idx
        else:
            if not _is_batch_dim(batch_dim_idx):
                raise ValueError(f"batch_dim_idx must be 0 or 1, got {batch_dim_idx!r}")
            if "rotary_pos_emb" in kwargs:
                rotary = kwargs.pop("rotary_pos_emb")
            else:
                rotary, args = (args[0], args[1:]) if args else (None, args)
            if rotary is not None:
                raise NotImplementedError(
                    "DistributedAttention(rotary_pos_emb=...) is not implemented in zerostep; apply the "
                    "rotary embedding inside local_attention (it sees whole sequences)"
                )
            if self.scatter_idx != 2:
                raise ValueError(
                    f"with batch_dim_idx the heads are dim 2 (scatter_idx=2, DeepSpeed's default), "
                    f"got scatter_idx={self.scatter_idx}"
                )
            seq_dim, head_dim = 1 - batch_dim_idx, 2
        return ulysses.attention_over_heads(
            self.local_attn, query, key, value, self.spg, seq_dim, head_dim, args, kwargs
        )


def _is_batch_dim(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in (0, 1)


__all__ = ["DistributedAttention"]
