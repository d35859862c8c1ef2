"""DeepSpeed 0.16+'s ``tensor_parallel`` training block (``runtime/tensor_parallel/config.py``).

``autotp_size`` N > 1 splits the world into a data-parallel x tensor-parallel mesh of N consecutive
ranks per tensor-parallel group (``parallel/mesh.py``): the model's planned Linear / Embedding weights
are sharded over the group before the engine flattens them (``core/autotp.py``), and the batch triple
is resolved for the data-parallel size, world / N. 0 and 1 are off, as in DeepSpeed.

The block's other keys drive DeepSpeed's model conversion and inference kernels, which zerostep's
training does not have: each is accepted with DeepSpeed's default and warned about when set otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zerostep.core.config.values import Block, ConfigError, integer, show, warn

# key -> (DeepSpeed's default, why it has no effect here)
_NO_EFFECT: dict[str, tuple[Any, str]] = {
    "dtype": (None, "the compute dtype comes from the fp16 / bf16 blocks"),
    "tp_overlap_comm": (False, "tensor-parallel all-reduces run where the forward needs them"),
    "tensor_parallel": ({}, "the inference TP settings; training takes autotp_size"),
    "tp": ({}, "the inference TP settings; training takes autotp_size"),
    "injection_policy_tuple": (None, "policies come from core/autotp.py (or the model's own plan)"),
    "keep_module_on_host": (False, "the model is sharded where it is"),
    "replace_with_kernel_inject": (False, "zerostep injects no inference kernels"),
    "kernel_inject": (False, "zerostep injects no inference kernels"),
}


@dataclass(frozen=True)
class TensorParallelConfig:
    autotp_size: int = 0  # 0 or 1: off

    @property
    def size(self) -> int:
        """The tensor-parallel group size (1 when off)."""
        return max(1, self.autotp_size)


def parse_tensor_parallel(block: Block | None) -> TensorParallelConfig:
    if block is None:
        return TensorParallelConfig()
    size = block.take("autotp_size", 0, lambda path, v: integer(path, v, minimum=0))
    for key, (default, why) in _NO_EFFECT.items():
        if block.has(key):
            block.allow(key)
            value = block.raw[key]
            if value != default and not (key == "dtype" and value is None):
                warn(f"tensor_parallel.{key} = {show(value)} has no effect in zerostep: {why}")
    block.finish()
    return TensorParallelConfig(autotp_size=size)


def check_zero_stage(tp: TensorParallelConfig, stage: int) -> None:
    """AutoTP trains with ZeRO stages 0-2 (DeepSpeed asserts the same): stage 3 is refused."""
    if tp.size > 1 and stage == 3:
        raise ConfigError(
            f"tensor_parallel.autotp_size = {tp.size} with zero_optimization.stage = 3: not supported (as "
            "in DeepSpeed, AutoTP training combines with ZeRO stages 0-2); use stage 2 to shard gradients"
        )


def data_parallel_size(world_size: int | None, resolved: int, tp: TensorParallelConfig) -> int:
    """The batch triple's world size: ``world_size`` when given (it counts data-parallel ranks), else
    the process group's size ``resolved`` over the tensor-parallel size, which must divide it."""
    if world_size is not None or tp.size == 1:
        return resolved
    if resolved % tp.size:
        raise ConfigError(
            f"tensor_parallel.autotp_size = {tp.size} does not divide the world size {resolved}: the "
            f"ranks form world / autotp_size data-parallel replicas of autotp_size ranks each"
        )
    return resolved // tp.size
