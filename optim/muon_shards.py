"""How Muon gets whole matrices when ZeRO shards the flat buffers: its two distributed strategies.

At ZeRO stages 1-3 rank ``r`` holds ``full[r * S:(r + 1) * S]`` of each unit's flat buffer [N * S], and a
Muon matrix may be cut by a shard boundary, while Newton-Schulz needs it whole. Every rank computes its
momentum and Muon direction ``u`` on its own shard first; then (``optimizer.params.distributed``):

- ``"owner"`` (the default): each matrix has one owner, the rank holding most of its elements (ties: the
  lower rank), so a matrix inside one shard is its holder's and moves nowhere. One all-to-all per unit
  brings each owner the other holders' slices of ``u`` of its cut matrices; each rank orthogonalizes
  only the matrices it owns; a second all-to-all (the first's splits reversed) returns to every holder
  its slice of the result. A unit no matrix of which is cut issues no collective at all (every rank
  derives the same plan from the unit's layout, ``FlatPieces.param_offsets``). Per step a rank sends its
  slices of the cut matrices others own, and the other holders' slices of the cut matrices it owns.
- ``"allgather"``: one all-gather of the unit's whole fp32 ``u`` [N * S] per step; each rank
  orthogonalizes every matrix touching its shard, a cut matrix on each of its holders.

Measured (``benchmarks/muon_update.py``, the small GPT's update on 2 and 4 gloo ranks; numbers in
docs/ARCHITECTURE.md): the owner strategy sends 1/6 (2 ranks) to 1/4 (4 ranks) of the all-gather's
bytes and was faster at both, by 1.3-1.5x at 4 ranks, so it is the default.
``comm_elements`` gives the elements one rank's collectives move, for ``core.accounting``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from zerostep.errors import ConfigError

DISTRIBUTED_STRATEGIES = ("owner", "allgather")

# (send [sum(send_splits)], send_splits, recv_splits) -> received [sum(recv_splits)], rank-major
Exchange = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]


class Matrix(NamedTuple):
    """One Muon parameter in a unit's full flat buffer."""

    offset: int  # its first element in the full buffer
    numel: int
    ns_shape: tuple[int, ...]  # what Newton-Schulz sees (leading dimensions are a batch)
    scale: float  # the factor on its orthogonalized update
    name: str = ""  # the parameter's (a model-parallel split is looked up by it)


class OwnerPlan(NamedTuple):
    """One rank's part in the owner strategy for one leaf, fixed for the optimizer's lifetime.

    Positions are local to the shard [S] (``("local", lo, hi)``), to the first exchange's received
    buffer (``("recv", lo, hi)``), to an owned matrix's flattened result (``("own", k, lo, hi)``), or
    to the second exchange's received buffer (``("back", lo, hi)``)."""

    owned: tuple[Matrix, ...]  # the matrices this rank orthogonalizes
    parts: tuple[tuple[tuple[str, int, int], ...], ...]  # per owned matrix: its slices in order
    batches: tuple[tuple[int, ...], ...]  # owned matrices (indices) grouped by ns_shape
    send: tuple[tuple[int, int], ...]  # local slices of u sent to their owners, destination-major
    send_splits: tuple[int, ...]  # [N] elements sent to each rank by the first exchange
    recv_splits: tuple[int, ...]  # [N] elements received from each rank by the first exchange
    back_send: tuple[tuple[int, int, int], ...]  # (owned k, lo, hi) of results returned, destination-major
    segments: tuple[
        tuple, ...
    ]  # the shard's update in order: ("zeros", n), ("own", k, lo, hi), ("back", lo, hi)
    exchanges: bool  # some matrix of the unit is cut by a shard boundary: every rank calls the exchanges


def holders(m: Matrix, shard: int) -> list[tuple[int, int, int]]:
    """(rank, start, stop) of each rank's slice of ``m``, in full-buffer positions, rank order."""
    end = m.offset + m.numel
    first, last = m.offset // shard, (end - 1) // shard
    return [(q, max(m.offset, q * shard), min(end, (q + 1) * shard)) for q in range(first, last + 1)]


def owner_of(m: Matrix, shard: int) -> int:
    """The rank holding most of ``m`` (the lowest such rank on a tie)."""
    return max(holders(m, shard), key=lambda h: (h[2] - h[1], -h[0]))[0]


def owner_plan(matrices: Sequence[Matrix], rank: int, shard: int, world_size: int) -> OwnerPlan:
    """``rank``'s plan, from every Muon matrix of the unit (sorted by offset) and the shard size."""
    base = rank * shard
    hold = [holders(m, shard) for m in matrices]
    own = [owner_of(m, shard) for m in matrices]
    # this rank's slices, in shard order: (matrix index, local lo, local hi)
    local = [(i, s - base, e - base) for i, h in enumerate(hold) for q, s, e in h if q == rank]
    owned = [i for i in range(len(matrices)) if own[i] == rank]
    k_of = {i: k for k, i in enumerate(owned)}

    send, send_splits, back_at = [], [0] * world_size, {}
    for q in range(world_size):  # destination-major; the owner reads them in the same order
        for i, lo, hi in local:
            if own[i] == q != rank:
                back_at[i] = (sum(send_splits), sum(send_splits) + hi - lo)  # where its result comes back
                send.append((lo, hi))
                send_splits[q] += hi - lo

    recv_splits, recv_at, back_send = [0] * world_size, {}, []
    for q in range(world_size):
        for i in owned:
            for qq, s, e in hold[i]:
                if qq == q != rank:
                    at = sum(recv_splits)
                    recv_at[(i, q)] = (at, at + e - s)
                    recv_splits[q] += e - s
                    off = matrices[i].offset
                    back_send.append((k_of[i], s - off, e - off))

    parts = tuple(
        tuple(
            ("local", s - base, e - base) if q == rank else ("recv", *recv_at[(i, q)]) for q, s, e in hold[i]
        )
        for i in owned
    )
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, i in enumerate(owned):
        by_shape.setdefault(matrices[i].ns_shape, []).append(k)

    segments, at = [], 0
    for i, lo, hi in local:
        if lo > at:
            segments.append(("zeros", lo - at))
        if own[i] == rank:
            start = lo + base - matrices[i].offset  # the slice's first element within the matrix
            segments.append(("own", k_of[i], start, start + hi - lo))
        else:
            segments.append(("back", *back_at[i]))
        at = hi
    if at < shard:
        segments.append(("zeros", shard - at))
    return OwnerPlan(
        owned=tuple(matrices[i] for i in owned),
        parts=parts,
        batches=tuple(tuple(ks) for ks in by_shape.values()),
        send=tuple(send),
        send_splits=tuple(send_splits),
        recv_splits=tuple(recv_splits),
        back_send=tuple(back_send),
        segments=tuple(segments),
        exchanges=any(len(h) > 1 for h in hold),
    )


def owner_orthogonalized(
    direction: torch.Tensor,
    plan: OwnerPlan,
    orthogonalize: Callable[[torch.Tensor, tuple[Matrix, ...]], torch.Tensor],
    exchange: Exchange | None,
) -> torch.Tensor:
    """The shard's Muon update [S] from its direction [S]: gather cut matrices to their owners,
    ``orthogonalize`` (a batch [B, *ns_shape] and its B matrices -> [B, *ns_shape]) the owned ones,
    return the holders' slices."""
    received = None
    if plan.exchanges:
        if exchange is None:
            raise ValueError("Muon's owner strategy over sharded flat leaves needs an exchange (all-to-all)")
        send = _cat([direction[lo:hi] for lo, hi in plan.send], direction)
        received = exchange(send, list(plan.send_splits), list(plan.recv_splits))
    results: list[torch.Tensor] = [direction] * len(plan.owned)  # placeholders, each filled below
    for batch in plan.batches:
        fulls = []
        for k in batch:
            pieces = [(direction if src == "local" else received)[lo:hi] for src, lo, hi in plan.parts[k]]
            fulls.append(_cat(pieces, direction).view(plan.owned[k].ns_shape))
        ortho = orthogonalize(torch.stack(fulls), tuple(plan.owned[k] for k in batch))
        for k, o in zip(batch, ortho.unbind(0)):
            results[k] = o.reshape(-1) * plan.owned[k].scale
    back = None
    if plan.exchanges:
        send = _cat([results[k][lo:hi] for k, lo, hi in plan.back_send], direction)
        back = exchange(send, list(plan.recv_splits), list(plan.send_splits))
    parts = []
    for seg in plan.segments:
        if seg[0] == "zeros":
            parts.append(direction.new_zeros(seg[1]))
        elif seg[0] == "own":
            parts.append(results[seg[1]][seg[2] : seg[3]])
        else:
            parts.append(back[seg[1] : seg[2]])
    return _cat(parts, direction)


def comm_elements(matrices: Sequence[Matrix], rank: int, shard: int, world_size: int, strategy: str) -> int:
    """The fp32 elements this rank's Muon collectives move per step for one sharded unit, in
    ``parallel.collectives``' convention: an all-gather counts its result (the full buffer [N * S]),
    the owner strategy's two all-to-alls the elements this rank sends. 0: no collective."""
    if not matrices or world_size <= 1:
        return 0
    if strategy == "allgather":
        return world_size * shard
    plan = owner_plan(matrices, rank, shard, world_size)
    return sum(plan.send_splits) + sum(plan.recv_splits) if plan.exchanges else 0


def comm_calls(matrices: Sequence[Matrix], shard: int, world_size: int, strategy: str) -> int:
    """How many collectives one unit's Muon update issues per step (every rank the same)."""
    if not matrices or world_size <= 1:
        return 0
    if strategy == "allgather":
        return 1
    return 2 if any(len(holders(m, shard)) > 1 for m in matrices) else 0


def check_strategy(strategy: str) -> None:
    if strategy not in DISTRIBUTED_STRATEGIES:
        raise ConfigError(
            f"optimizer.params.distributed: {strategy!r} is invalid; it must be one of "
            f"{list(DISTRIBUTED_STRATEGIES)}"
        )


def _cat(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not parts:
        return like.new_zeros(0)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
