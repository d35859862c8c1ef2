"""The ``elasticity`` block: parsed with DeepSpeed's keys and defaults; when enabled it decides the batch
triple for the world size (core/elasticity.py), as DeepSpeed's config does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zerostep.core.config.batch import BATCH_KEYS, Batch
from zerostep.core.config.values import (
    DERIVED,
    Block,
    Context,
    boolean,
    fail,
    integer,
    integer_list,
    positive_int,
    warn,
)
from zerostep.core.elasticity import (
    ElasticityConfig,
    ElasticityConfigError,
    check_scheduler_agrees,
    elastic_batch,
)

_MICRO_BATCH_SIZES = integer_list(1, "positive integers")


def _version(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise fail(path, value, "must be 0.1 or 0.2")
    try:
        version = float(value)
    except ValueError:
        raise fail(path, value, "must be 0.1 or 0.2") from None
    if version not in (0.1, 0.2):
        raise fail(path, value, "must be 0.1 or 0.2 (DeepSpeed's elasticity versions)")
    return version


def parse_elasticity(block: Block | None) -> ElasticityConfig:
    if block is None:
        return ElasticityConfig()
    d = ElasticityConfig()
    enabled = block.take("enabled", d.enabled, boolean)
    if enabled:
        for key in ("max_train_batch_size", "micro_batch_sizes"):
            if not block.has(key):
                raise ElasticityConfigError(f"elasticity.{key} is required when elasticity is enabled")
    config = ElasticityConfig(
        enabled=enabled,
        max_train_batch_size=block.take("max_train_batch_size", d.max_train_batch_size, positive_int),
        micro_batch_sizes=block.take(
            "micro_batch_sizes", d.micro_batch_sizes, integer_list(1, "positive integers")
        ),
        min_gpus=block.take("min_gpus", d.min_gpus, positive_int),
        max_gpus=block.take("max_gpus", d.max_gpus, positive_int),
        min_time=block.take("min_time", d.min_time, lambda p, v: integer(p, v, minimum=0)),
        version=block.take("version", d.version, _version),
        prefer_larger_batch=block.take("prefer_larger_batch", d.prefer_larger_batch, boolean),
        ignore_non_elastic_batch_info=block.take(
            "ignore_non_elastic_batch_info", d.ignore_non_elastic_batch_info, boolean
        ),
        num_gpus_per_node=block.take("num_gpus_per_node", d.num_gpus_per_node, positive_int),
        model_parallel_size=block.take("model_parallel_size", d.model_parallel_size, positive_int),
    )
    block.finish()
    if config.max_gpus < config.min_gpus:
        raise fail(
            block.key_path("max_gpus"), config.max_gpus, f"must be >= elasticity.min_gpus ({config.min_gpus})"
        )
    if enabled and config.model_parallel_size > 1:
        raise fail(
            block.key_path("model_parallel_size"),
            config.model_parallel_size,
            "zerostep has no model parallelism yet: the elastic world size is the data-parallel size",
        )
    if enabled and config.min_time:
        warn(
            f"elasticity.min_time = {config.min_time} has no effect in zerostep: it tells a resource "
            "scheduler how long to wait between rescales; the engine itself never rescales"
        )
    return config


def elastic_read_batch(top: Block, world_size: int, elastic: ElasticityConfig) -> Batch:
    """The batch triple elasticity picks for ``world_size`` (DeepSpeed's rule: batch keys in the
    config are an error unless ``ignore_non_elastic_batch_info``, then a warning that they are
    overridden)."""
    top.allow(*BATCH_KEYS)
    given = [key for key in BATCH_KEYS if key in top.raw]
    chosen = elastic_batch(elastic, world_size)
    micro = int(chosen.micro_batch_size)
    batch = Batch(chosen.train_batch_size, micro, chosen.train_batch_size // (micro * world_size))
    if given and not elastic.ignore_non_elastic_batch_info:
        raise ElasticityConfigError(
            f"{', '.join(given)} given with elasticity enabled: elasticity decides the batch "
            f"(here {batch.train_batch_size} = {micro} x {batch.gradient_accumulation_steps} x {world_size} "
            "ranks); remove them, or set elasticity.ignore_non_elastic_batch_info = true to have them "
            "overridden"
        )
    for key in given:
        if top.raw[key] != getattr(batch, key):
            warn(f"{key} = {top.raw[key]} is overridden by elasticity: {getattr(batch, key)}")
    for key in BATCH_KEYS:
        top.record(key, DERIVED)
    check_scheduler_agrees(elastic)
    return batch


def elasticity_of(ds_config: Mapping[str, Any]) -> ElasticityConfig:
    """The ``elasticity`` block of a DeepSpeed config dict (for ``compute_elastic_config``)."""
    if not isinstance(ds_config, Mapping):
        raise ValueError(f"expected a DeepSpeed config dict, got {type(ds_config).__name__}")
    if "elasticity" not in ds_config:
        raise ElasticityConfigError("the config has no 'elasticity' block: add one to train elastically")
    raw = ds_config["elasticity"]
    if not isinstance(raw, Mapping):
        raise ElasticityConfigError(f"elasticity must be a block, got {type(raw).__name__}")
    return parse_elasticity(Block(raw, "elasticity", Context(lambda path: "user")))
