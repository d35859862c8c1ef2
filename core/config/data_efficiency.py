"""The ``data_efficiency`` block (DeepSpeed 0.19's keys and defaults, deepspeed/runtime/data_pipeline/).

zerostep serves ``data_routing.random_ltd`` (random layer-wise token dropping, core/random_ltd.py) and
``data_sampling.curriculum_learning`` (the metric-based curriculum of DeepSpeed's dataloader,
core/config/data_sampling.py and core/data_sampler.py); ``data_sampling.dynamic_batching`` is refused.

As in DeepSpeed, random-LTD is on when ``data_routing.random_ltd.enabled`` is, whatever the outer
``data_efficiency.enabled`` and ``data_routing.enabled`` say (DeepSpeed's engine reads only the inner
switch); zerostep warns when an outer switch is off while random-LTD is on. The keys DeepSpeed reads
without a default (``total_layer_num``, ``random_ltd_layer_num``, ``random_ltd_layer_id``,
``model_mask_name``, ``model_type``, ``hidden_state_order``, ``random_ltd_schedule``) are required.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zerostep.core.config.data_sampling import DataSamplingConfig, parse_data_sampling
from zerostep.core.config.values import (
    Block,
    ConfigError,
    boolean,
    choice,
    fail,
    integer,
    integer_list,
    optional,
    positive_int,
    text,
    warn,
)

DEFAULT_SEED = 1234  # DeepSpeed's DATA_EFFICIENCY_SEED_DEFAULT


@dataclass(frozen=True)
class RandomLTDStepConfig:
    """``random_ltd_schedule.schedule_config`` of ``fixed_linear``."""

    require_steps: int = 1  # steps for the kept-token count to ramp from min_value to max_value
    seq_per_step: int = 1  # kept-token counts are multiples of it


@dataclass(frozen=True)
class RandomLTDScheduleConfig:
    min_value: int = 1  # kept tokens per sequence at the first step
    max_value: int = 1  # ... at the end of the ramp (the full sequence length, usually)
    schedule_type: str = "fixed_linear"  # the only type DeepSpeed's RandomLTDScheduler computes
    schedule_config: RandomLTDStepConfig = field(default_factory=RandomLTDStepConfig)


@dataclass(frozen=True)
class LayerTokenLRConfig:
    enabled: bool = False  # DeepSpeed raises NotImplementedError when it is on; so does zerostep


@dataclass(frozen=True)
class RandomLTDConfig:
    enabled: bool = False
    total_layer_num: int = 0  # transformer layers of the model (for the consumed-token count)
    random_ltd_layer_num: int = 0  # how many of them drop tokens
    random_ltd_layer_id: tuple[int, ...] = ()  # which, by index among the converted layers
    model_mask_name: str | None = None  # the layer's keyword argument holding the attention mask
    model_type: str = "decoder"  # decoder: the mask's top-left block; encoder: rows and columns gathered
    hidden_state_order: str = "batch_seq_dim"  # or seq_batch_dim: where the sequence dimension is
    random_ltd_schedule: RandomLTDScheduleConfig = field(default_factory=RandomLTDScheduleConfig)
    layer_token_lr_schedule: LayerTokenLRConfig = field(default_factory=LayerTokenLRConfig)


@dataclass(frozen=True)
class DataRoutingConfig:
    enabled: bool = False
    random_ltd: RandomLTDConfig = field(default_factory=RandomLTDConfig)


@dataclass(frozen=True)
class DataEfficiencyConfig:
    enabled: bool = False
    seed: int = DEFAULT_SEED  # seeds the curriculum's data sampler; random-LTD does not read it
    data_sampling: DataSamplingConfig = field(default_factory=DataSamplingConfig)
    data_routing: DataRoutingConfig = field(default_factory=DataRoutingConfig)


def _layer_ids(path: str, value: Any) -> tuple[int, ...]:
    ids = integer_list(0, "layer indices")(path, value)
    if len(set(ids)) != len(ids):
        raise fail(path, list(value), "must not repeat a layer index")
    return tuple(sorted(ids))  # DeepSpeed sorts them too


def _require(block: Block, *keys: str) -> None:
    for key in keys:
        if not block.has(key):
            raise fail(
                block.key_path(key), None, "is required when random_ltd is enabled (DeepSpeed reads it)"
            )


def parse_data_efficiency(block: Block | None) -> DataEfficiencyConfig:
    if block is None:
        return DataEfficiencyConfig()
    enabled = block.take("enabled", False, boolean)
    seed = block.take("seed", DEFAULT_SEED, lambda p, v: integer(p, v, minimum=0))
    sampling = parse_data_sampling(block.child("data_sampling"), enabled)
    routing = _parse_routing(block.child("data_routing"))
    block.finish()
    if routing.random_ltd.enabled:
        if not enabled or not routing.enabled:
            off = "data_efficiency.enabled" if not enabled else "data_efficiency.data_routing.enabled"
            warn(
                f"{off} is false but data_routing.random_ltd.enabled is true: random-LTD runs, "
                "as in DeepSpeed"
            )
        if seed != DEFAULT_SEED and not sampling.curriculum_learning.enabled:
            warn(
                f"data_efficiency.seed = {seed} has no effect in zerostep: it seeds DeepSpeed's data "
                "sampler; "
                "random-LTD draws its tokens from the engine's per-step seed"
            )
    return DataEfficiencyConfig(enabled=enabled, seed=seed, data_sampling=sampling, data_routing=routing)


def _parse_routing(block: Block | None) -> DataRoutingConfig:
    if block is None:
        return DataRoutingConfig()
    enabled = block.take("enabled", False, boolean)
    ltd = parse_random_ltd(block.child("random_ltd"))
    block.finish()
    return DataRoutingConfig(enabled=enabled, random_ltd=ltd)


def parse_random_ltd(block: Block | None) -> RandomLTDConfig:
    if block is None:
        return RandomLTDConfig()
    if not block.take("enabled", False, boolean):
        block.allow(*block.raw)  # an off block is not read further, as in DeepSpeed
        return RandomLTDConfig()
    _require(
        block,
        "total_layer_num",
        "random_ltd_layer_num",
        "random_ltd_layer_id",
        "model_mask_name",
        "model_type",
        "hidden_state_order",
        "random_ltd_schedule",
    )
    total = block.take("total_layer_num", 0, positive_int)
    count = block.take("random_ltd_layer_num", 0, positive_int)
    ids = block.take("random_ltd_layer_id", (), _layer_ids)
    if count != len(ids):
        raise fail(
            block.key_path("random_ltd_layer_num"),
            count,
            f"must equal the length of random_ltd_layer_id ({len(ids)}), as DeepSpeed requires",
        )
    if count > total:
        raise fail(block.key_path("random_ltd_layer_num"), count, f"must be <= total_layer_num ({total})")
    if ids[-1] >= total:
        raise fail(
            block.key_path("random_ltd_layer_id"), list(ids), f"indices must be < total_layer_num ({total})"
        )
    config = RandomLTDConfig(
        enabled=True,
        total_layer_num=total,
        random_ltd_layer_num=count,
        random_ltd_layer_id=ids,
        model_mask_name=block.take("model_mask_name", None, optional(text)),
        model_type=block.take(
            "model_type", "decoder", choice(("decoder", "encoder"), case_insensitive=False)
        ),
        hidden_state_order=block.take(
            "hidden_state_order",
            "batch_seq_dim",
            choice(("batch_seq_dim", "seq_batch_dim"), case_insensitive=False),
        ),
        random_ltd_schedule=_parse_schedule(block.child("random_ltd_schedule")),
        layer_token_lr_schedule=_parse_layer_token_lr(block.child("layer_token_lr_schedule")),
    )
    block.allow("micro_batch_size", "global_batch_size")  # DeepSpeed's engine overwrites both
    for key in ("micro_batch_size", "global_batch_size"):
        if block.has(key):
            warn(
                f"{block.key_path(key)} has no effect: the engine sets it from the config's batch sizes, "
                "as DeepSpeed's does"
            )
    block.finish()
    if config.model_type == "encoder" and config.model_mask_name is None:
        raise fail(
            block.key_path("model_mask_name"),
            None,
            "an encoder's random-LTD gathers the attention mask's rows and columns: name the "
            "layer's mask argument",
        )
    return config


def _parse_schedule(block: Block | None) -> RandomLTDScheduleConfig:
    if block is None:
        raise ConfigError("data_efficiency.data_routing.random_ltd.random_ltd_schedule: is required")
    for key in ("min_value", "max_value", "schedule_type", "schedule_config"):
        if not block.has(key):
            raise fail(block.key_path(key), None, "is required (DeepSpeed's RandomLTDScheduler reads it)")
    low = block.take("min_value", 1, positive_int)
    high = block.take("max_value", 1, positive_int)
    kind = block.take("schedule_type", "fixed_linear", text)
    if kind != "fixed_linear":
        raise fail(
            block.key_path("schedule_type"), kind, 'must be "fixed_linear" (the only type DeepSpeed computes)'
        )
    if high < low:
        raise fail(block.key_path("max_value"), high, f"must be >= min_value ({low})")
    sc = block.child("schedule_config")
    if sc is None:
        raise fail(block.key_path("schedule_config"), None, "must be a JSON object")
    for key in ("require_steps", "seq_per_step"):
        if not sc.has(key):
            raise fail(sc.key_path(key), None, "is required for schedule_type fixed_linear")
    steps = RandomLTDStepConfig(
        require_steps=sc.take("require_steps", 1, positive_int),
        seq_per_step=sc.take("seq_per_step", 1, positive_int),
    )
    sc.finish()
    block.finish()
    if low < steps.seq_per_step:
        # DeepSpeed rounds every count down to a multiple of seq_per_step: the first would keep 0 tokens
        raise fail(
            block.key_path("min_value"),
            low,
            f"must be >= schedule_config.seq_per_step ({steps.seq_per_step}): counts are rounded down to "
            "multiples of it, and the first step would keep no token",
        )
    return RandomLTDScheduleConfig(min_value=low, max_value=high, schedule_type=kind, schedule_config=steps)


def _parse_layer_token_lr(block: Block | None) -> LayerTokenLRConfig:
    if block is None:
        return LayerTokenLRConfig()
    if block.take("enabled", False, boolean):
        raise fail(
            block.key_path("enabled"),
            True,
            "the layer-token learning-rate schedule is not implemented (DeepSpeed 0.19 raises "
            "NotImplementedError for it too); switch it off",
        )
    block.allow(*block.raw)  # total_layer_tokens, warmup_type, warmup_layer_tokens: read only when on
    return LayerTokenLRConfig()
