"""DeepSpeed's ``deepspeed.utils.groups`` accessors for sequence parallelism.

They answer from the sequence-parallel groups made last in this process (``zerostep.parallel.ulysses``:
by a model built with ``sequence_parallel_size``, by ``initialize_sequence_parallel``, or by the engine
for the config's ``sequence_parallel_size``). Without tensor or pipeline parallelism the
sequence-data-parallel group, over which gradients are reduced, is every rank; the data-parallel size (the
batch triple's) is ``world / sequence_parallel_size``.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from zerostep.parallel import ulysses


def _groups() -> ulysses.SequenceGroups | None:
    return ulysses.current_sequence_groups()


def _get_sequence_parallel_group() -> Any:
    """The sequence-parallel group; KeyError when none was made, as DeepSpeed."""
    groups = _groups()
    if groups is None or groups.sp_group is None:
        raise KeyError(
            "No sequence parallel group found: set sequence_parallel_size in the config (or build the "
            "groups with zerostep.parallel.ulysses.initialize_sequence_parallel) on several ranks"
        )
    return groups.sp_group


def _get_sequence_parallel_world_size() -> int:
    groups = _groups()
    return 1 if groups is None else groups.sp_size


def _get_sequence_parallel_rank() -> int:
    groups = _groups()
    return 0 if groups is None else groups.sp_rank


def _get_sequence_data_parallel_group() -> Any:
    return dist.group.WORLD if dist.is_initialized() else None


def _get_sequence_data_parallel_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _get_sequence_data_parallel_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
