"""Batches: validation, device placement and the split into micro-batches.

A batch is any pytree of tensors whose leading dimension holds this rank's
``train_micro_batch_size_per_gpu x gradient_accumulation_steps`` samples; micro-batch ``i`` is rows
``[i * MB, (i + 1) * MB)`` of every tensor leaf (views, no copies). Non-tensor leaves pass through.

``BatchSpec`` is a batch's structure, shapes and dtypes. Under ``torch.compile`` a batch unlike the
first step's makes dynamo recompile, and a bad one (a wrong feature size, a missing key) fails inside
fake-tensor tracing with a traceback of a hundred frames; the engine compares each batch's spec with
the first step's instead and says in one line what differs (``BatchSpec.mismatch``, ``sizes_differ``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optree
import torch


def check_batch(batch: Any, micro_batch_size: int, accumulation_steps: int) -> None:
    want = micro_batch_size * accumulation_steps
    leaves = [x for x in optree.tree_leaves(batch, none_is_leaf=False) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise ValueError(
            "batch holds no tensors; expected a pytree of tensors with a leading batch dimension"
        )
    for path, leaf in zip(*optree.tree_flatten_with_path(batch)[:2]):
        if not isinstance(leaf, torch.Tensor):
            continue
        where = "/".join(str(p) for p in path) or "batch"
        if leaf.dim() == 0 or leaf.shape[0] != want:
            raise ValueError(
                f"batch leaf {where!r} has shape {tuple(leaf.shape)}; its leading dimension must be "
                f"train_micro_batch_size_per_gpu x gradient_accumulation_steps = "
                f"{micro_batch_size} x {accumulation_steps} = {want}"
            )


def to_device(batch: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Move tensor leaves to ``device``; floating ones also to ``float_dtype`` (the compute dtype), as
    FSDP's ``cast_forward_inputs`` does, so a bf16/fp16 model takes fp32 inputs unchanged."""

    def move(x):
        if not isinstance(x, torch.Tensor):
            return x
        dtype = float_dtype if float_dtype is not None and x.is_floating_point() else x.dtype
        if x.device == device and x.dtype == dtype:
            return x
        return x.to(device=device, dtype=dtype, non_blocking=True)

    return optree.tree_map(move, batch)


def micro_batches(batch: Any, micro_batch_size: int, accumulation_steps: int) -> list[Any]:
    if accumulation_steps == 1:
        return [batch]

    def rows(i: int):
        lo, hi = i * micro_batch_size, (i + 1) * micro_batch_size
        return lambda x: x[lo:hi] if isinstance(x, torch.Tensor) else x

    return [optree.tree_map(rows(i), batch) for i in range(accumulation_steps)]


@dataclass(frozen=True)
class BatchSpec:
    """A batch's tree structure and, per tensor leaf (by path), its shape and dtype."""

    structure: Any  # optree.PyTreeSpec
    leaves: tuple[tuple[str, tuple[int, ...], torch.dtype] | None, ...]  # None: a non-tensor leaf

    @staticmethod
    def of(batch: Any) -> BatchSpec:
        paths, leaves, structure = optree.tree_flatten_with_path(batch)
        return BatchSpec(
            structure,
            tuple(
                (_where(path), tuple(leaf.shape), leaf.dtype) if isinstance(leaf, torch.Tensor) else None
                for path, leaf in zip(paths, leaves)
            ),
        )

    def mismatch(self, other: BatchSpec) -> str | None:
        """What in ``other`` cannot be the same kind of batch as this one (structure, a leaf's number of
        dimensions or dtype), or None. Sizes may differ (e.g. sequence lengths): see ``sizes_differ``."""
        if other.structure != self.structure:
            return f"its structure is {other.structure}, the first step's was {self.structure}"
        for mine, theirs in zip(self.leaves, other.leaves):
            if (mine is None) != (theirs is None):
                where, now = (mine or theirs)[0], "a tensor" if theirs else "not a tensor"
                return f"leaf {where!r} is {now} now, unlike in the first step's batch"
            if mine is None:
                continue
            where, shape, dtype = theirs
            if len(shape) != len(mine[1]) or dtype != mine[2]:
                return (
                    f"leaf {where!r} has shape {shape} and dtype {_name(dtype)}; the first step's had shape "
                    f"{mine[1]} and dtype {_name(mine[2])}"
                )
        return None

    def sizes_differ(self, other: BatchSpec) -> str | None:
        """The first leaf of ``other`` (same kind of batch) whose sizes differ from this one's, or None."""
        for mine, theirs in zip(self.leaves, other.leaves):
            if mine is not None and theirs is not None and mine[1] != theirs[1]:
                return f"leaf {theirs[0]!r} has shape {theirs[1]}; the first step's had {mine[1]}"
        return None


def _where(path: tuple) -> str:
    return "/".join(str(p) for p in path) or "batch"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
