"""The ``zero_optimization`` block: DeepSpeed 0.19's ``DeepSpeedZeroConfig`` keys, aliases and defaults.

Attributes use the ``stage3_*`` spellings DeepSpeed's docs and most configs use; the short pydantic
field names (``prefetch_bucket_size``, ...) are accepted as aliases.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from zerostep.core.config.values import (
    Block,
    boolean,
    choice,
    fail,
    integer,
    mapping,
    number,
    optional,
    size,
    text,
    warn,
)


@dataclass(frozen=True)
class OffloadOptimizerConfig:
    device: str = "cpu"
    nvme_path: str | None = None
    buffer_count: int = 4
    pin_memory: bool = False
    pipeline_read: bool = False
    pipeline_write: bool = False
    fast_init: bool = False
    ratio: float = 1.0
    super_offload: bool = False
    convert_grad_on_cpu: bool = True
    cpuadam_cores_perc: float = 0.8


@dataclass(frozen=True)
class OffloadParamConfig:
    device: str = "cpu"
    nvme_path: str | None = None
    buffer_count: int = 5
    buffer_size: int = 100_000_000
    max_in_cpu: int = 1_000_000_000
    pin_memory: bool = False


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = 0
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_partitions: bool = True
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False  # DeepSpeed's default is stage == 3; from_dict resolves it
    # zerostep's own key (Megatron-LM's --overlap-param-gather): stages 1-2 with overlap_comm leave the
    # parameter all-gather running into the next forward, which waits for each block in a pre-hook.
    # Off by default: it asks that a block's parameters be used only through its own forward.
    overlap_param_gather: bool = False
    round_robin_gradients: bool = False
    use_multi_rank_bucket_allreduce: bool = True
    load_from_fp32_weights: bool = True
    ignore_unused_parameters: bool = True
    sub_group_size: int = 1_000_000_000
    offload_optimizer: OffloadOptimizerConfig | None = None
    offload_param: OffloadParamConfig | None = None
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_model_persistence_threshold: int = sys.maxsize
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: bool = False
    stage3_module_granularity_threshold: int = 0
    stage3_use_all_reduce_for_fetch_params: bool = False
    stage3_allgather_sequential: bool = False
    stage3_partition_stream_chunk_size: int = 0

    @property
    def enabled(self) -> bool:
        return self.stage > 0


def _stage(path: str, value: Any) -> int:
    stage = integer(path, value)
    if not 0 <= stage <= 3:
        raise fail(path, value, "must be 0, 1, 2 or 3 (the ZeRO stage; DeepSpeed's maximum is 3)")
    return stage


def _ratio(path: str, value: Any) -> float:
    ratio = number(path, value, minimum=0.0)
    if ratio > 1.0:
        raise fail(path, value, "must be in [0, 1]")
    return ratio


def _device(path: str, value: Any) -> str:
    device = choice(("none", "cpu", "nvme"), case_insensitive=False)(path, value)
    if device == "nvme":
        raise fail(
            path,
            value,
            "offload to NVMe is not implemented by zerostep (it needs DeepSpeed's async "
            'I/O); use "cpu" or remove the offload block',
        )
    return device


def _parse_offload_optimizer(block: Block) -> OffloadOptimizerConfig | None:
    d = OffloadOptimizerConfig()
    device = block.take("device", "none", _device)
    config = OffloadOptimizerConfig(
        device=device,
        nvme_path=block.take("nvme_path", d.nvme_path, optional(text)),
        buffer_count=block.take("buffer_count", d.buffer_count, size),
        pin_memory=block.take("pin_memory", d.pin_memory, boolean),
        pipeline_read=block.take("pipeline_read", d.pipeline_read, boolean),
        pipeline_write=block.take("pipeline_write", d.pipeline_write, boolean),
        fast_init=block.take("fast_init", d.fast_init, boolean),
        ratio=block.take("ratio", d.ratio, _ratio),
        super_offload=block.take("super_offload", d.super_offload, boolean),
        convert_grad_on_cpu=block.take("convert_grad_on_cpu", d.convert_grad_on_cpu, boolean),
        cpuadam_cores_perc=block.take("cpuadam_cores_perc", d.cpuadam_cores_perc, _ratio),
    )
    block.finish()
    return None if device == "none" else config  # device "none" is DeepSpeed's "no offload"


def _parse_offload_param(block: Block) -> OffloadParamConfig | None:
    d = OffloadParamConfig()
    device = block.take("device", "none", _device)
    config = OffloadParamConfig(
        device=device,
        nvme_path=block.take("nvme_path", d.nvme_path, optional(text)),
        buffer_count=block.take("buffer_count", d.buffer_count, size),
        buffer_size=block.take("buffer_size", d.buffer_size, size),
        max_in_cpu=block.take("max_in_cpu", d.max_in_cpu, size),
        pin_memory=block.take("pin_memory", d.pin_memory, boolean),
    )
    block.finish()
    return None if device == "none" else config


# DeepSpeed ZeRO keys that change nothing in zerostep's implementation: accepted, and a warning when
# set away from DeepSpeed's default (so a user relying on them learns they do nothing here).
_NO_EFFECT = {
    "elastic_checkpoint": (False, boolean, "zerostep always reshards checkpoints on load"),
    "legacy_stage1": (False, boolean, "zerostep has one stage-1 implementation"),
    "memory_efficient_linear": (True, boolean, "it tunes DeepSpeed's stage-3 module hooks"),
    "override_module_apply": (True, boolean, "it tunes DeepSpeed's stage-3 module hooks"),
    "pipeline_loading_checkpoint": (False, boolean, "zerostep has no pipeline engine"),
    "log_trace_cache_warnings": (False, boolean, "zerostep has no stage-3 trace cache"),
    "enable_sanity_checks": (False, boolean, "it enables DeepSpeed-internal checks"),
    "save_muon_momentum_buffer_in_memory": (
        False,
        boolean,
        "it keeps Muon's momentum out of DeepSpeed's NVMe swapping; zerostep has no NVMe offload, and "
        "Muon's momentum (its exp_avg state) always stays in memory",
    ),
    "cpu_offload_use_pin_memory": (
        None,
        optional(boolean),
        "DeepSpeed ignores it too (deprecated); use offload_optimizer.pin_memory",
    ),
    "leaf_module": ({}, mapping, "zerostep has no stage-3 module hooks"),
}

# ZeRO features zerostep does not implement: an error when the value turns them on.
_UNSUPPORTED = {
    "zero_quantized_weights": (False, boolean, "ZeRO++ quantized weights"),
    "zero_quantized_nontrainable_weights": (False, boolean, "ZeRO++ quantized weights"),
    "zero_quantized_gradients": (False, boolean, "ZeRO++ quantized gradients"),
    "zero_hpz_partition_size": (1, lambda p, v: integer(p, v, minimum=0), "ZeRO++ hierarchical partitioning"),
    "mics_shard_size": (-1, integer, "MiCS sharding"),
    "mics_hierarchical_params_gather": (False, boolean, "MiCS sharding"),
    "zenflow": (None, optional(mapping), "ZenFlow"),
    "zeropp_loco_param": (None, optional(mapping), "LoCo-ZeRO++"),
}


def _off(key: str, value: Any) -> bool:
    """Whether an unsupported feature's value leaves it off."""
    if key == "zero_hpz_partition_size":
        return value <= 1
    if key == "mics_shard_size":
        return value <= 0
    return value in (None, False) or (isinstance(value, dict) and not value)


def _deprecated_offload(block: Block, key: str, target: str, present: Any) -> bool:
    """``cpu_offload`` / ``cpu_offload_param``: true means ``{target: {device: cpu}}``."""
    flag = block.take(key, None, optional(boolean))
    if flag is None:
        return False
    warn(
        f"{block.key_path(key)} is deprecated in DeepSpeed; read as {target}: {{device: cpu}}"
        if flag
        else f"{block.key_path(key)} = false is deprecated in DeepSpeed and has no effect"
    )
    if flag and present is not None:
        raise fail(block.key_path(key), flag, f"conflicts with {block.key_path(target)}: give only {target}")
    if flag:
        block.record(f"{target}.device", block.origin(key))
    return flag


def parse_zero(block: Block | None) -> ZeroConfig:
    if block is None:
        return ZeroConfig()
    d = ZeroConfig()
    stage = block.take("stage", d.stage, _stage)
    offload_block = block.child("offload_optimizer")
    offload_optimizer = None if offload_block is None else _parse_offload_optimizer(offload_block)
    param_block = block.child("offload_param")
    offload_param = None if param_block is None else _parse_offload_param(param_block)
    if _deprecated_offload(block, "cpu_offload", "offload_optimizer", offload_block):
        offload_optimizer = OffloadOptimizerConfig(device="cpu")
    if _deprecated_offload(block, "cpu_offload_param", "offload_param", param_block):
        offload_param = OffloadParamConfig(device="cpu")

    def bucket(key: str, default: int, aliases: tuple[str, ...] = ()) -> int:
        return block.take(key, default, size, aliases=aliases, auto=True)

    config = ZeroConfig(
        stage=stage,
        contiguous_gradients=block.take("contiguous_gradients", d.contiguous_gradients, boolean),
        reduce_scatter=block.take("reduce_scatter", d.reduce_scatter, boolean),
        reduce_bucket_size=bucket("reduce_bucket_size", d.reduce_bucket_size),
        allgather_partitions=block.take("allgather_partitions", d.allgather_partitions, boolean),
        allgather_bucket_size=bucket("allgather_bucket_size", d.allgather_bucket_size),
        overlap_comm=block.take("overlap_comm", stage == 3, optional(boolean)),
        overlap_param_gather=block.take("overlap_param_gather", d.overlap_param_gather, boolean),
        round_robin_gradients=block.take("round_robin_gradients", d.round_robin_gradients, boolean),
        use_multi_rank_bucket_allreduce=block.take(
            "use_multi_rank_bucket_allreduce", d.use_multi_rank_bucket_allreduce, boolean
        ),
        load_from_fp32_weights=block.take("load_from_fp32_weights", d.load_from_fp32_weights, boolean),
        ignore_unused_parameters=block.take("ignore_unused_parameters", d.ignore_unused_parameters, boolean),
        sub_group_size=bucket("sub_group_size", d.sub_group_size),
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        stage3_prefetch_bucket_size=bucket(
            "stage3_prefetch_bucket_size", d.stage3_prefetch_bucket_size, ("prefetch_bucket_size",)
        ),
        stage3_param_persistence_threshold=bucket(
            "stage3_param_persistence_threshold",
            d.stage3_param_persistence_threshold,
            ("param_persistence_threshold",),
        ),
        stage3_model_persistence_threshold=bucket(
            "stage3_model_persistence_threshold",
            d.stage3_model_persistence_threshold,
            ("model_persistence_threshold",),
        ),
        stage3_max_live_parameters=bucket(
            "stage3_max_live_parameters", d.stage3_max_live_parameters, ("max_live_parameters",)
        ),
        stage3_max_reuse_distance=bucket(
            "stage3_max_reuse_distance", d.stage3_max_reuse_distance, ("max_reuse_distance",)
        ),
        stage3_gather_16bit_weights_on_model_save=block.take(
            "stage3_gather_16bit_weights_on_model_save",
            d.stage3_gather_16bit_weights_on_model_save,
            boolean,
            aliases=("gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save"),
        ),
        stage3_module_granularity_threshold=bucket(
            "stage3_module_granularity_threshold",
            d.stage3_module_granularity_threshold,
            ("module_granularity_threshold",),
        ),
        stage3_use_all_reduce_for_fetch_params=block.take(
            "stage3_use_all_reduce_for_fetch_params",
            d.stage3_use_all_reduce_for_fetch_params,
            boolean,
            aliases=("use_all_reduce_for_fetch_params",),
        ),
        stage3_allgather_sequential=block.take(
            "stage3_allgather_sequential",
            d.stage3_allgather_sequential,
            boolean,
            aliases=("allgather_sequential",),
        ),
        stage3_partition_stream_chunk_size=bucket(
            "stage3_partition_stream_chunk_size",
            d.stage3_partition_stream_chunk_size,
            ("partition_stream_chunk_size",),
        ),
    )
    if config.overlap_comm is None:  # explicit null: DeepSpeed's validator fills stage == 3
        config = dataclasses.replace(config, overlap_comm=stage == 3)
    for key, (default, convert, reason) in _NO_EFFECT.items():
        value = block.take(key, default, convert)
        if block.has(key) and value != default:
            warn(f"{block.key_path(key)} = {value!r} has no effect in zerostep: {reason}")
    for key, (default, convert, feature) in _UNSUPPORTED.items():
        value = block.take(key, default, convert)
        if not _off(key, value):
            raise fail(
                block.key_path(key), value, f"{feature} is not implemented by zerostep; remove the key"
            )
    if offload_param is not None and stage != 3:
        warn(
            f"{block.key_path('offload_param')} has no effect at stage {stage}: parameter offload is "
            "stage 3 only (DeepSpeed ignores it too)"
        )
    if offload_optimizer is not None and offload_optimizer.ratio < 1.0 and stage != 3:
        raise fail(
            block.key_path("offload_optimizer.ratio"),
            offload_optimizer.ratio,
            "partial optimizer offload (ratio < 1) needs stage 3",
        )
    block.finish()
    return config


def parse_legacy_zero(flag: bool, top: Block) -> ZeroConfig:
    """``"zero_optimization": true/false`` (DeepSpeed's old form): true is stage 1, with the bucket
    size read from the top-level ``allgather_size``."""
    warn(
        f'"zero_optimization": {str(flag).lower()} is a deprecated DeepSpeed form; read as '
        f'{{"stage": {1 if flag else 0}}}'
    )
    if not flag:
        top.take("allgather_size", None, optional(size))
        return ZeroConfig()
    allgather = top.take("allgather_size", 500_000_000, size)
    return ZeroConfig(stage=1, allgather_bucket_size=allgather)
