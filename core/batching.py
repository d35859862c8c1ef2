"""Batches: validation, device placement and the split into micro-batches.

A batch is any pytree of tensors whose leading dimension holds this rank's
``train_micro_batch_size_per_gpu x gradient_accumulation_steps`` samples; micro-batch ``i`` is rows
``[i * MB, (i + 1) * MB)`` of every tensor leaf (views, no copies). Non-tensor leaves pass through.
"""

from __future__ import annotations

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
