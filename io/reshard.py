"""Resharding on load: a flat leaf saved over W ranks, read as one rank's part for any W'.

Saved rank s holds elements ``[s * L, (s + 1) * L)`` of the logical tensor, L the leaf table's
``shard_numel`` (``shard_numel(numel, W)`` of the version that wrote it); the loading rank r needs
``[r * L', (r + 1) * L')``, L' = shard_numel(numel, W'). Each saved file that overlaps is asked for
exactly the overlapping element range (``PytreeReader.read_elements`` reads just those bytes and the
checksum blocks around them); the part past ``numel`` is zero padding::

    saved  W=2:  |---- s0 ----|---- s1 --pad|
    loaded W=3:  |-- r0 --|-- r1 --|-- r2 --pad|      r1 reads the end of s0 and the start of s1
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from zerostep.io.codec import dtype_from_name
from zerostep.io.errors import CheckpointError
from zerostep.io.manifest import CheckpointDir, shard_numel


def read_flat_range(
    ckpt: CheckpointDir,
    path: str,
    start: int,
    stop: int,
    out: torch.Tensor | None,
    verify: bool,
    in_place: bool = False,
) -> None:
    """Fill ``out`` [stop - start] with elements [start, stop) of flat leaf ``path``; 0 past numel.
    ``out=None`` only checks the checksums of those elements (``verify`` must be True); ``in_place``:
    ``out`` is memory already in use (``PytreeReader.read_elements``)."""
    entry = ckpt.leaves.get(path)
    if entry is None or entry["kind"] != "flat":
        raise CheckpointError(ckpt.path, f"no flat-sharded leaf {path!r} in this checkpoint")
    if out is None and not verify:
        raise ValueError("read_flat_range: out=None only checks checksums, so verify must be True")
    numel, saved = entry["numel"], entry["shard_numel"]
    end = min(stop, numel)
    if end < stop and out is not None:
        out[max(0, end - start) :].zero_()
    for s in range(start // saved, -(-end // saved) if end > start else 0):
        lo, hi = max(start, s * saved), min(end, (s + 1) * saved)
        if lo >= hi:
            continue
        reader = ckpt.reader(s)
        if out is None:
            reader.check_elements(path, lo - s * saved, hi - s * saved)
        else:
            reader.read_elements(
                path,
                lo - s * saved,
                hi - s * saved,
                out=out[lo - start : hi - start],
                verify=verify,
                in_place=in_place,
            )


def read_flat_moved(
    ckpt: CheckpointDir,
    path: str,
    moves: Sequence[tuple[int, int, int]],
    start: int,
    stop: int,
    out: torch.Tensor | None,
    verify: bool,
    in_place: bool = False,
) -> None:
    """``read_flat_range`` for a buffer packed differently from the saved leaf: ``moves`` holds
    ``(offset here, offset saved, numel)`` per piece (a parameter), and ``out`` [stop - start] takes
    elements [start, stop) of the buffer they describe, zero outside every piece. This reads a
    checkpoint written with another layout (zerostep's packing before entries were aligned)."""
    if out is not None:
        out.zero_()
    for here, saved, numel in moves:
        lo, hi = max(start, here), min(stop, here + numel)
        if lo < hi:
            part = None if out is None else out[lo - start : hi - start]
            read_flat_range(ckpt, path, saved + lo - here, saved + hi - here, part, verify, in_place)


def load_flat_shard(
    ckpt: CheckpointDir, path: str, rank: int, world_size: int, *, verify: bool = True
) -> torch.Tensor:
    """Rank ``rank``'s part [shard_numel(numel, world_size)] of flat leaf ``path`` for ``world_size``."""
    entry = ckpt.leaves[path]
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    length = shard_numel(entry["numel"], world_size)
    out = torch.empty(length, dtype=dtype_from_name(entry["dtype"]))
    read_flat_range(ckpt, path, rank * length, (rank + 1) * length, out, verify)
    return out


def read_flat(
    load_dir: str | os.PathLike, tag: str | None, path: str, *, verify: bool = True
) -> torch.Tensor:
    """The whole logical 1-D tensor [numel] of flat leaf ``path``, assembled from every rank's file."""
    with CheckpointDir.open(load_dir, tag, verify=verify) as ckpt:
        entry = ckpt.leaves.get(path)
        if entry is None or entry["kind"] != "flat":
            raise CheckpointError(ckpt.path, f"no flat-sharded leaf {path!r} in this checkpoint")
        out = torch.empty(entry["numel"], dtype=dtype_from_name(entry["dtype"]))
        read_flat_range(ckpt, path, 0, entry["numel"], out, verify)
        return out
