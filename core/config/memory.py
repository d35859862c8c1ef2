"""The ``activation_checkpointing`` block (DeepSpeed 0.19's keys and defaults, plus zerostep's own
``checkpoint_units``), and what each key does in zerostep.

DeepSpeed's keys configure ``deepspeed.checkpointing.checkpoint`` (``zerostep.checkpointing`` here), which
only checkpoints what the model wraps. ``checkpoint_units: true`` (zerostep's key, off by default) also
checkpoints every ZeRO unit (each child of the outermost ``ModuleList``/``Sequential``: the transformer
blocks) without touching the model's code; it is opt-in because a model that already wraps its blocks
in ``deepspeed.checkpointing.checkpoint`` would otherwise recompute each block twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from zerostep.core.config.values import Block, boolean, integer, optional, warn


@dataclass(frozen=True)
class ActivationCheckpointingConfig:
    partition_activations: bool = False  # split checkpoints over model-parallel ranks: none in zerostep
    cpu_checkpointing: bool = False  # checkpoints (the wrapped functions' inputs) kept in host memory
    contiguous_memory_optimization: bool = False  # DeepSpeed's preallocated buffers: no effect here
    number_checkpoints: int | None = None  # sizes those buffers: no effect here
    synchronize_checkpoint_boundary: bool = False  # device synchronize around each checkpoint
    profile: bool = False  # log each checkpoint's forward and recomputation time
    checkpoint_units: bool = False  # zerostep: checkpoint every ZeRO unit automatically


def parse_activation_checkpointing(block: Block | None) -> ActivationCheckpointingConfig:
    if block is None:
        return ActivationCheckpointingConfig()
    d = ActivationCheckpointingConfig()
    config = ActivationCheckpointingConfig(
        partition_activations=block.take("partition_activations", d.partition_activations, boolean),
        cpu_checkpointing=block.take("cpu_checkpointing", d.cpu_checkpointing, boolean),
        contiguous_memory_optimization=block.take(
            "contiguous_memory_optimization", d.contiguous_memory_optimization, boolean
        ),
        number_checkpoints=block.take(
            "number_checkpoints", d.number_checkpoints, optional(lambda p, v: integer(p, v, minimum=1))
        ),
        synchronize_checkpoint_boundary=block.take(
            "synchronize_checkpoint_boundary", d.synchronize_checkpoint_boundary, boolean
        ),
        profile=block.take("profile", d.profile, boolean),
        checkpoint_units=block.take("checkpoint_units", d.checkpoint_units, boolean),
    )
    block.finish()
    for message in inert_options(config, model_parallel_size=1):
        warn(f"activation_checkpointing.{message}")
    return config


def inert_options(config: ActivationCheckpointingConfig, model_parallel_size: int) -> list[str]:
    """``"<key> = <value> has no effect ...: why"`` for every option set that zerostep does not act on."""
    out = []
    if config.partition_activations:
        where = (
            "zerostep has no model parallelism"
            if model_parallel_size <= 1
            else f"zerostep keeps each checkpoint whole on all {model_parallel_size} model-parallel ranks"
        )
        out.append(
            "partition_activations = true has no effect: DeepSpeed splits each checkpoint over the "
            f"model-parallel ranks (which hold the same activations), and {where}"
        )
    if config.contiguous_memory_optimization:
        out.append(
            "contiguous_memory_optimization = true has no effect: checkpoints live in PyTorch's caching "
            "allocator, which already reuses their blocks (DeepSpeed's preallocated buffers avoid "
            "fragmentation of partitioned checkpoints, which zerostep does not make)"
        )
    if config.number_checkpoints is not None:
        out.append(
            f"number_checkpoints = {config.number_checkpoints} has no effect: it only sizes the "
            "contiguous_memory_optimization buffers"
        )
    return out
