"""A DeepSpeed JSON config, parsed into typed frozen dataclasses with DeepSpeed 0.19's names and defaults.

    config = Config.from_file("ds_config.json", world_size=8, train_micro_batch_size_per_gpu=4)
    config.gradient_accumulation_steps, config.fp16.initial_scale_power, config.zero_optimization.stage

Every bad input raises :class:`ConfigError` naming the key path, the value and the rule. Keys for
DeepSpeed features zerostep lacks are errors when they turn the feature on and ``ConfigWarning``s
otherwise (``config.features``). ``"auto"`` is filled where zerostep can derive it; the rest are
reported together, each with what would fill it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from zerostep.core.config.batch import BATCH_KEYS, read_batch, resolve_world_size
from zerostep.core.config.blocks import (
    CheckpointConfig,
    CSVMonitorConfig,
    OptimizerConfig,
    SchedulerConfig,
    TensorBoardConfig,
    WandbConfig,
    parse_checkpoint,
    parse_file_monitor,
    parse_optimizer,
    parse_scheduler,
    parse_wandb,
    thaw,
)
from zerostep.core.config.data_efficiency import DataEfficiencyConfig, parse_data_efficiency
from zerostep.core.config.elastic import elastic_read_batch, parse_elasticity
from zerostep.core.config.features import check_other_keys
from zerostep.core.config.hybrid import HybridEngineConfig, parse_hybrid_engine
from zerostep.core.config.load import merge_sources, origin_lookup, read_config_file
from zerostep.core.config.memory import ActivationCheckpointingConfig, parse_activation_checkpointing
from zerostep.core.config.observe import (
    CometConfig,
    CommsLoggerConfig,
    FlopsProfilerConfig,
    parse_comet,
    parse_comms_logger,
    parse_flops_profiler,
)
from zerostep.core.config.precision import (
    BF16Config,
    DataTypesConfig,
    FP16Config,
    TorchAutocastConfig,
    check_low_precision_master,
    parse_bf16,
    parse_data_types,
    parse_fp16,
    parse_torch_autocast,
)
from zerostep.core.config.schedules import (
    CurriculumConfig,
    ProgressiveLayerDropConfig,
    parse_curriculum,
    parse_progressive_layer_drop,
)
from zerostep.core.config.tensor_parallel import (
    TensorParallelConfig,
    check_zero_stage,
    data_parallel_size,
    parse_tensor_parallel,
)
from zerostep.core.config.values import (
    FLOAT32_TINY,
    Block,
    ConfigWarning,
    Context,
    boolean,
    fail,
    integer,
    non_negative,
    number,
    optional,
    positive_int,
)
from zerostep.core.config.zero import (
    OffloadOptimizerConfig,
    OffloadParamConfig,
    ZeroConfig,
    parse_legacy_zero,
    parse_zero,
)
from zerostep.core.elasticity import ElasticityConfig
from zerostep.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ActivationCheckpointingConfig",
    "BF16Config",
    "CurriculumConfig",
    "ProgressiveLayerDropConfig",
    "TorchAutocastConfig",
    "CSVMonitorConfig",
    "CheckpointConfig",
    "CometConfig",
    "CommsLoggerConfig",
    "Config",
    "ConfigError",
    "ConfigWarning",
    "DataTypesConfig",
    "FP16Config",
    "FlopsProfilerConfig",
    "HybridEngineConfig",
    "OffloadOptimizerConfig",
    "OffloadParamConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TensorBoardConfig",
    "WandbConfig",
    "ZeroConfig",
]


@dataclass(frozen=True)
class Config:
    """A resolved DeepSpeed config. Build it with :meth:`from_dict` or :meth:`from_file`."""

    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    world_size: int = 1  # ranks; the batch triple is resolved for world_size // sequence_parallel_size
    sequence_parallel_size: int = 1  # DeepSpeed-Ulysses: ranks that split each sequence (parallel/ulysses.py)
    gradient_clipping: float = 1.0  # clipping happens only when > 0 (DeepSpeed >= 0.19.5 default)
    gradient_predivide_factor: float = 1.0
    prescale_gradients: bool = False
    steps_per_print: int = 10
    wall_clock_breakdown: bool = False
    memory_breakdown: bool = False  # per-rank memory lines every steps_per_print
    dataloader_drop_last: bool = False
    seed: int | None = None
    sparse_gradients: bool = False  # stage 0: sparse embedding gradients (core/sparse_gradients.py)
    fp16: FP16Config = field(default_factory=FP16Config)
    bf16: BF16Config = field(default_factory=BF16Config)
    zero_optimization: ZeroConfig = field(default_factory=ZeroConfig)
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data_types: DataTypesConfig = field(default_factory=DataTypesConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    csv_monitor: CSVMonitorConfig = field(default_factory=CSVMonitorConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    comet: CometConfig = field(default_factory=CometConfig)
    flops_profiler: FlopsProfilerConfig = field(default_factory=FlopsProfilerConfig)
    comms_logger: CommsLoggerConfig = field(default_factory=CommsLoggerConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(
        default_factory=ActivationCheckpointingConfig
    )
    torch_autocast: TorchAutocastConfig = field(default_factory=TorchAutocastConfig)
    elasticity: ElasticityConfig = field(default_factory=ElasticityConfig)
    progressive_layer_drop: ProgressiveLayerDropConfig = field(default_factory=ProgressiveLayerDropConfig)
    curriculum_learning: CurriculumConfig = field(default_factory=CurriculumConfig)
    data_efficiency: DataEfficiencyConfig = field(default_factory=DataEfficiencyConfig)
    hybrid_engine: HybridEngineConfig = field(default_factory=HybridEngineConfig)
    tensor_parallel: TensorParallelConfig = field(default_factory=TensorParallelConfig)
    # Dotted key path -> where its value came from ("file", "user", "override", "default", "derived",
    # "auto"); for `zerostep config check`. Not part of equality: a round trip through to_dict()
    # makes every value explicit.
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def source(self, path: str) -> str:
        """Where the value at dotted ``path`` came from: "file", "user" (from_dict), "override",
        "default", "derived" (batch keys computed from the others) or "auto" (filled by zerostep)."""
        while path:
            if path in self.sources:
                return self.sources[path]
            path = path.rpartition(".")[0]  # a key inside a block given (or defaulted) as a whole
        return "default"

    @property
    def data_parallel_size(self) -> int:
        """Ranks that read different samples: ``world_size / sequence_parallel_size`` (the batch triple's
        world size, as DeepSpeed's config computes it)."""
        return self.world_size // self.sequence_parallel_size

    @property
    def compute_dtype(self) -> torch.dtype:
        import torch

        if self.bf16.enabled:
            return torch.bfloat16
        if self.fp16.enabled:
            return torch.float16
        return torch.float32

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        world_size: int | None = None,
        overrides: Mapping[str, Any] | None = None,
        **kw_overrides: Any,
    ) -> Config:
        """Parse a DeepSpeed config dict; ``overrides`` and keyword overrides merge into it (a key
        given twice must have the same value)."""
        return _parse([("the config dict", "user", d)], world_size, overrides, kw_overrides)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        world_size: int | None = None,
        overrides: Mapping[str, Any] | None = None,
        **kw_overrides: Any,
    ) -> Config:
        """Parse a DeepSpeed JSON (or hjson) config file; overrides as in :meth:`from_dict`."""
        data = read_config_file(path)
        return _parse([(f"file {os.fspath(path)!r}", "file", data)], world_size, overrides, kw_overrides)

    def to_dict(self) -> dict[str, Any]:
        """A DeepSpeed config dict with every value explicit; ``Config.from_dict(c.to_dict(),
        world_size=c.world_size) == c``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("world_size", "sources"):
                continue
            value = getattr(self, f.name)
            if value is None:
                continue  # optimizer, scheduler, seed: absent is DeepSpeed's "none"
            if f.name in BATCH_KEYS and self.elasticity.enabled:
                continue  # elasticity decides them
            out[f.name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    if hasattr(value, "deepspeed_dict"):  # a block whose DeepSpeed form nests differently from its fields
        return value.deepspeed_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None or f.name not in ("offload_optimizer", "offload_param")
        }
    if isinstance(value, Mapping):  # e.g. curriculum_metrics: names to dataclasses
        return {key: _plain(item) for key, item in value.items()}
    return thaw(value)


def _seed(path: str, value: Any) -> int:
    return integer(path, value, minimum=0)


def _parse(
    sources: list[tuple[str, str, Any]],
    world_size: Any,
    overrides: Mapping[str, Any] | None,
    kw_overrides: Mapping[str, Any],
) -> Config:
    if overrides is not None:
        sources.append(("overrides", "override", overrides))
    if kw_overrides:
        sources.append(("keyword overrides", "override", dict(kw_overrides)))
    merged, labels = merge_sources(sources)
    ctx = Context(origin_lookup(labels, "default"))
    top = Block(merged, "", ctx)
    tensor_parallel = parse_tensor_parallel(top.child("tensor_parallel"))
    # the batch triple's world size counts data-parallel ranks (DeepSpeed's dp_world_size)
    ws = data_parallel_size(world_size, resolve_world_size(world_size), tensor_parallel)

    fp16 = parse_fp16(top.child("fp16"))
    bf16 = parse_bf16(top.child("bf16", aliases=("bfloat16",)))
    if fp16.enabled and bf16.enabled:
        raise ConfigError(
            "fp16.enabled = true and bf16.enabled = true: choose one mixed-precision mode "
            "(DeepSpeed rejects both at once too)"
        )
    zero_raw = merged.get("zero_optimization")
    if isinstance(zero_raw, bool):
        top.allow("zero_optimization", "allgather_size")
        zero = parse_legacy_zero(zero_raw, top)
    else:
        zero = parse_zero(top.child("zero_optimization"))
    check_low_precision_master(fp16, bf16, zero.stage)
    check_zero_stage(tensor_parallel, int(zero.stage))
    optimizer = parse_optimizer(top.child("optimizer"))
    scheduler = parse_scheduler(top.child("scheduler"), optimizer)
    sp = _sequence_parallel_size(top, ws)
    config = dict(
        world_size=ws,
        sequence_parallel_size=sp,
        gradient_clipping=top.take("gradient_clipping", 1.0, non_negative, auto=True),
        gradient_predivide_factor=top.take("gradient_predivide_factor", 1.0, _positive),
        prescale_gradients=top.take("prescale_gradients", False, boolean),
        steps_per_print=top.take("steps_per_print", 10, _steps_per_print, auto=True),
        wall_clock_breakdown=top.take("wall_clock_breakdown", False, boolean),
        memory_breakdown=top.take("memory_breakdown", False, boolean),
        dataloader_drop_last=top.take("dataloader_drop_last", False, boolean),
        seed=top.take("seed", None, optional(_seed)),
        sparse_gradients=top.take("sparse_gradients", False, boolean),
        fp16=fp16,
        bf16=bf16,
        zero_optimization=zero,
        optimizer=optimizer,
        scheduler=scheduler,
        checkpoint=parse_checkpoint(top.child("checkpoint")),
        data_types=parse_data_types(top.child("data_types")),
        tensorboard=parse_file_monitor(top.child("tensorboard"), TensorBoardConfig),
        csv_monitor=parse_file_monitor(top.child("csv_monitor"), CSVMonitorConfig),
        wandb=parse_wandb(top.child("wandb")),
        comet=parse_comet(top.child("comet")),
        flops_profiler=parse_flops_profiler(top.child("flops_profiler")),
        comms_logger=parse_comms_logger(top.child("comms_logger")),
        activation_checkpointing=parse_activation_checkpointing(top.child("activation_checkpointing")),
        torch_autocast=parse_torch_autocast(top.child("torch_autocast")),
        elasticity=parse_elasticity(top.child("elasticity")),
        progressive_layer_drop=parse_progressive_layer_drop(top.child("progressive_layer_drop")),
        curriculum_learning=parse_curriculum(top.child("curriculum_learning")),
        data_efficiency=parse_data_efficiency(top.child("data_efficiency")),
        hybrid_engine=parse_hybrid_engine(top.child("hybrid_engine")),
        tensor_parallel=tensor_parallel,
    )
    top.allow(*BATCH_KEYS)
    check_other_keys(merged, top.known)
    elastic = config["elasticity"]
    # last: its "auto"s are reported with all the others
    dp = ws // sp  # the batch triple counts data-parallel replicas (DeepSpeed: world / sp)
    batch = elastic_read_batch(top, dp, elastic) if elastic.enabled else read_batch(top, dp)
    ctx.raise_unresolved()
    return Config(**batch._asdict(), **config, sources=MappingProxyType(dict(ctx.sources)))


def _positive(path: str, value: Any) -> float:
    result = number(path, value)
    if result <= 0:
        raise fail(path, value, "must be > 0 (gradients are divided by it)")
    if result < FLOAT32_TINY:  # 1 / factor would be infinite in float32
        raise fail(path, value, "must be >= 1.2e-38 (float32's smallest normal; gradients are divided by it)")
    return result


def _sequence_parallel_size(top: Block, world_size: int) -> int:
    """``sequence_parallel_size`` (Ulysses), which must divide the world; DeepSpeed's mesh key
    ``data_parallel_size``, when given, must be the rest of it."""
    sp = top.take("sequence_parallel_size", 1, positive_int)
    if world_size % sp:
        raise fail(
            "sequence_parallel_size",
            sp,
            f"must divide the world size {world_size} (each sequence-parallel group is "
            "sequence_parallel_size consecutive ranks)",
        )
    dp = top.take("data_parallel_size", None, optional(positive_int))
    if dp is not None and dp * sp != world_size:
        raise fail(
            "data_parallel_size",
            dp,
            f"data_parallel_size x sequence_parallel_size = {dp} x {sp} must equal the world size "
            f"{world_size}",
        )
    return sp


def _steps_per_print(path: str, value: Any) -> int:
    # DeepSpeed 0.19 defaults to None (no progress printing); zerostep's engine prints every N steps.
    return integer(path, value, minimum=1)
