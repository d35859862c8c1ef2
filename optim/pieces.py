"""Where each parameter lies in a flat leaf: what optimizers that need whole parameters are told.

The engine hands optimizers one flat fp32 buffer per ZeRO unit, and under ZeRO stages 1-3 only this
rank's shard of it. Elementwise optimizers need nothing more; Muon (whole matrices), mup (per-parameter
width multipliers) and torch.optim classes run per parameter need to know which element ranges of the
leaf belong to which parameter. ``FlatPieces`` says that, per leaf; ``layout_pieces`` builds it from a
flat layout's entries (anything with ``name``, ``shape``, ``offset``, ``numel``), so this package needs no
import from ``zerostep.parallel``. Without pieces (a plain pytree of tensors), every leaf is one whole
parameter named by its pytree path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import optree
import torch

from zerostep.optim.base import PerLeaf, PyTree, per_leaf


class ParamPiece(NamedTuple):
    """The part of one parameter inside a flat leaf."""

    start: int  # first element of the piece in the leaf
    stop: int  # one past its last element in the leaf
    index: int  # the parameter's position in its layout (pieces of one parameter on several ranks share it)
    name: str  # the parameter's name (e.g. "blocks.0.attn.weight")
    shape: tuple[int, ...]  # the whole parameter's shape
    param_start: int  # the piece's first element within the flattened parameter

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def whole(self) -> bool:
        """The piece is the entire parameter (it was not cut by a shard boundary)."""
        return self.param_start == 0 and self.numel == math.prod(self.shape)


class FlatPieces(NamedTuple):
    """Static description of one flat leaf: the parameter pieces it holds, in order.

    ``offset`` is the leaf's first element in the full (unsharded) buffer and ``sharded`` says whether
    the leaf is one rank's shard of a buffer split over ranks, whose other pieces live elsewhere (then
    a whole parameter must be gathered). ``full_numel`` is the padded full buffer's length."""

    pieces: tuple[ParamPiece, ...]
    sharded: bool = False
    offset: int = 0
    full_numel: int = 0
    params: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (name, shape) of every parameter in the buffer
    # each of ``params``' first element in the full buffer (entries may be aligned, not back to back);
    # empty when unknown. Muon's owner strategy plans every rank's exchange from it.
    param_offsets: tuple[int, ...] = ()

    def param_offset(self, piece: ParamPiece) -> int:
        """The parameter's first element in the full buffer."""
        return self.offset + piece.start - piece.param_start


def layout_pieces(entries: Sequence[Any], lo: int, hi: int, *, sharded: bool, full_numel: int) -> FlatPieces:
    """The pieces of a flat layout's ``entries`` that fall in the element range ``[lo, hi)`` of its
    buffer (a rank's shard, or the whole buffer)."""
    pieces = []
    for index, e in enumerate(entries):
        start, stop = max(lo, e.offset), min(hi, e.offset + e.numel)
        if start < stop:
            pieces.append(ParamPiece(start - lo, stop - lo, index, e.name, tuple(e.shape), start - e.offset))
    params = tuple((e.name, tuple(e.shape)) for e in entries)
    offsets = tuple(e.offset for e in entries)
    return FlatPieces(
        tuple(pieces), sharded=sharded, offset=lo, full_numel=full_numel, params=params, param_offsets=offsets
    )


def path_names(params: PyTree) -> list[str]:
    """A name per leaf of ``params``: its pytree path (keys, attribute names, indices) joined by '.'."""
    paths, _, _ = optree.tree_flatten_with_path(params)
    return [".".join(str(k) for k in path) or "param" for path in paths]


def resolve_pieces(param_pieces: PerLeaf, params: PyTree) -> list[FlatPieces]:
    """One ``FlatPieces`` per leaf of ``params``: the given ones, or for a leaf without, the leaf as one
    whole parameter of its own shape named by its path."""
    given = per_leaf(param_pieces, params, None)
    leaves = optree.tree_leaves(params)
    out = []
    for leaf, name, pieces in zip(leaves, path_names(params), given):
        if pieces is None:
            shape = tuple(leaf.shape)
            n = leaf.numel()
            piece = ParamPiece(0, n, 0, name, shape, 0)
            pieces = FlatPieces(
                (piece,), sharded=False, offset=0, full_numel=n, params=((name, shape),), param_offsets=(0,)
            )
        elif not isinstance(pieces, FlatPieces):
            kind = type(pieces).__name__
            raise TypeError(f"param_pieces for leaf {name!r} must be a FlatPieces, got {kind}")
        out.append(pieces)
    return out


def runs_tensor(
    n: int, runs: Iterable[tuple[int, int, float]], fill: float, dtype: torch.dtype, device: Any
) -> torch.Tensor:
    """A [n] tensor that is ``value`` on each ``(start, stop, value)`` run and ``fill`` elsewhere, built
    in one ``repeat_interleave`` (runs sorted, not overlapping)."""
    values, lengths, at = [], [], 0
    for start, stop, value in runs:
        if start > at:
            values.append(fill)
            lengths.append(start - at)
        values.append(value)
        lengths.append(stop - start)
        at = stop
    if at < n:
        values.append(fill)
        lengths.append(n - at)
    if not values:
        return torch.full((n,), fill, dtype=dtype, device=device)
    return torch.repeat_interleave(
        torch.tensor(values, dtype=dtype), torch.tensor(lengths, dtype=torch.long)
    ).to(device)
