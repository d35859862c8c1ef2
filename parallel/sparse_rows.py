"""All-gathers of a different number of rows per rank, for sparse gradients (DeepSpeed's
``sparse_all_gather``): each rank holds the touched rows of an embedding's gradient, whose count differs
from rank to rank, so the counts are exchanged first and every rank's rows are padded to the largest.

Both exchanges go through ``collectives.all_gather_into``, so they take the gloo algorithms and the
shared-memory channel the flat collectives take. Byte counts follow that module's convention (an
all-gather counts the bytes of its result).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zerostep.parallel.collectives import Group, all_gather_into, resolve_group


def all_gather_counts(counts: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Every rank's ``counts`` [K] (int64), as [N, K] in rank order; one all-gather."""
    group = resolve_group(group)
    world = dist.get_world_size(group)
    counts = counts.to(torch.int64).reshape(-1)
    out = counts.new_empty(world * counts.numel())
    all_gather_into(out, counts, group)
    return out.view(world, -1)


def all_gather_uneven(rows: torch.Tensor, counts: list[int], group: Group = None) -> torch.Tensor:
    """Every rank's ``rows`` [n_r, *row_shape] concatenated in rank order: [sum(counts), *row_shape].

    ``counts``: every rank's n_r (``all_gather_counts``), the same list on every rank. Rows are padded to
    ``max(counts)`` for one all-gather of equal shards; the padding is dropped after."""
    group = resolve_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(counts) != world or counts[rank] != rows.shape[0]:
        raise ValueError(f"counts {counts} do not match {rows.shape[0]} rows on rank {rank} of {world}")
    longest = max(counts)
    row_shape = tuple(rows.shape[1:])
    per_row = 1
    for s in row_shape:
        per_row *= s
    if longest == 0:
        return rows.new_empty((0, *row_shape))
    out = rows.new_zeros(world * longest * per_row)  # [N * longest * per_row]
    mine = out.view(world, -1)[rank]  # this rank's row of the gathered buffer: its rows, then padding
    mine[: rows.numel()].copy_(rows.reshape(-1))
    all_gather_into(out, mine, group)
    gathered = out.view(world, longest, *row_shape)  # [N, longest, *row_shape]
    return torch.cat([gathered[r, : counts[r]] for r in range(world)])


def uneven_gather_bytes(counts: list[int], row_bytes: int) -> int:
    """What ``all_gather_uneven`` moves: the padded result, ``N * max(counts)`` rows."""
    return len(counts) * max(counts, default=0) * row_bytes if len(counts) > 1 else 0
