"""The pipeline block and its schedules, all from ``torch.distributed.pipelining``.

``parse_pipeline_block`` reads DeepSpeed's ``"pipeline"`` config block plus zerostep's ``schedule`` key.
``build_schedule`` wraps this rank's stage modules in ``PipelineStage`` s over the pipe group and builds
the named schedule; zerostep has no send/recv scheduler of its own. Names:

| ``schedule``              | torch class                     | stages per rank |
|---------------------------|---------------------------------|-----------------|
| ``gpipe``                 | ``ScheduleGPipe``               | 1               |
| ``1f1b`` (default)        | ``Schedule1F1B``                | 1               |
| ``interleaved_1f1b``      | ``ScheduleInterleaved1F1B``     | >= 1, looped    |
| ``looped_bfs``            | ``ScheduleLoopedBFS``           | >= 1, looped    |
| ``interleaved_zero_bubble`` | ``ScheduleInterleavedZeroBubble`` | >= 1, looped |
| ``zbv_zero_bubble``       | ``ScheduleZBVZeroBubble``       | 2, V-shaped     |
| ``dualpipev``             | ``ScheduleDualPipeV``           | 2, V-shaped     |

DeepSpeed's default schedule (``TrainSchedule``) is a 1F1B schedule, hence the default. Names whose class
this torch lacks raise a clear error.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zerostep.errors import ConfigError

SCHEDULES = {
    "gpipe": ("ScheduleGPipe", "single"),
    "1f1b": ("Schedule1F1B", "single"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "looped_bfs": ("ScheduleLoopedBFS", "loop"),
    "interleaved_zero_bubble": ("ScheduleInterleavedZeroBubble", "loop"),
    "zbv_zero_bubble": ("ScheduleZBVZeroBubble", "v"),
    "dualpipev": ("ScheduleDualPipeV", "v"),
}

# DeepSpeed's pipeline keys: default, and why the key has no effect in zerostep when set otherwise
_INERT = {
    "partition": ("best", "the PipelineModule's partition_method decides the partition (as in DeepSpeed)"),
    "seed_layers": (False, "the PipelineModule's seed_layers decides (as in DeepSpeed)"),
    "pipe_partitioned": (True, "it partitions activations over tensor-parallel ranks; zerostep has none"),
    "grad_partitioned": (True, "it partitions gradients over tensor-parallel ranks; zerostep has none"),
    "use_reentrant": (None, "zerostep's activation checkpointing is always non-reentrant"),
}


@dataclass(frozen=True)
class PipelineOptions:
    schedule: str = "1f1b"
    stages: int | None = None  # None: "auto", the module's
    activation_checkpoint_interval: int = 0  # > 0 overrides the module's, as DeepSpeed


def parse_pipeline_block(block: Any) -> PipelineOptions:
    """``"pipeline": {...}``: DeepSpeed's keys and zerostep's ``schedule``; every bad value a
    ``ConfigError`` naming the key."""
    if block is None:
        return PipelineOptions()
    if not isinstance(block, Mapping):
        raise ConfigError(f"pipeline = {block!r}: must be an object")
    known = {"schedule", "stages", "activation_checkpoint_interval", *_INERT}
    for key in block:
        if key not in known:
            raise ConfigError(f"pipeline.{key}: unknown key (accepted: {', '.join(sorted(known))})")
    schedule = block.get("schedule", "1f1b")
    if not isinstance(schedule, str) or schedule.lower() not in SCHEDULES:
        raise ConfigError(f"pipeline.schedule = {schedule!r}: must be one of {', '.join(SCHEDULES)}")
    stages = block.get("stages", "auto")
    if stages == "auto":
        stages = None
    elif isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"pipeline.stages = {stages!r}: must be 'auto' or an integer >= 1")
    interval = block.get("activation_checkpoint_interval", 0)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
        raise ConfigError(f"pipeline.activation_checkpoint_interval = {interval!r}: must be an integer >= 0")
    for key, (default, why) in _INERT.items():
        if key in block and block[key] != default:
            warnings.warn(f"pipeline.{key} = {block[key]!r} has no effect in zerostep: {why}", stacklevel=3)
    return PipelineOptions(schedule.lower(), stages, interval)


def schedule_class(name: str) -> tuple[type, str]:
    """The torch schedule class for ``name`` and its stage layout (``single``, ``loop``, ``v``)."""
    from torch.distributed.pipelining import schedules

    cls_name, layout = SCHEDULES[name]
    cls = getattr(schedules, cls_name, None)
    if cls is None:
        raise NotImplementedError(
            f"pipeline.schedule {name!r}: this torch ({torch.__version__}) has no {cls_name}"
        )
    return cls, layout


def check_layout(name: str, stages_per_rank: int, virtual_style: str) -> None:
    """The module's stages per rank must fit the schedule's layout."""
    _, layout = SCHEDULES[name]
    if layout == "single" and stages_per_rank != 1:
        raise ValueError(
            f"pipeline.schedule {name!r} runs one stage per rank but the PipelineModule has "
            f"stages_per_rank={stages_per_rank}; use 'interleaved_1f1b' or another multi-stage schedule"
        )
    if layout == "v" and (stages_per_rank != 2 or virtual_style != "v"):
        raise ValueError(
            f"pipeline.schedule {name!r} needs PipelineModule(..., stages_per_rank=2, virtual_style='v')"
        )
    if layout == "loop" and virtual_style != "loop":
        raise ValueError(f"pipeline.schedule {name!r} needs virtual_style='loop' (stages r, r + p, ...)")


def build_schedule(
    name: str,
    chunks: list[nn.Module],
    stage_indices: list[int],
    total_stages: int,
    device: torch.device,
    group: Any,
    n_microbatches: int,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
) -> Any:
    """A torch schedule over this rank's ``chunks`` (stage ``stage_indices[i]`` of ``total_stages``).

    ``loss_fn`` None builds a forward-only schedule (evaluation). Gradients are not divided by the
    micro-batch count (``scale_grads=False``): the engine's loss function already carries ``1 / GAS``
    and the loss scale."""
    from torch.distributed.pipelining import PipelineStage

    cls, layout = schedule_class(name)
    stages = [
        PipelineStage(chunk, index, total_stages, device, group=group)
        for chunk, index in zip(chunks, stage_indices)
    ]
    if layout == "single":
        return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
