"""``deepspeed.elasticity``: the elastic batch computation (machinery in zerostep/core/elasticity.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zerostep.core.config.elastic import elasticity_of
from zerostep.core.elasticity import (
    MINIMUM_DEEPSPEED_VERSION,
    ElasticityConfig,
    ElasticityConfigError,
    ElasticityError,
    ElasticityIncompatibleWorldSize,
    elastic_batch,
    version_tuple,
)

__all__ = [
    "ElasticityConfig",
    "ElasticityConfigError",
    "ElasticityError",
    "ElasticityIncompatibleWorldSize",
    "compute_elastic_config",
    "elasticity_enabled",
]


def elasticity_enabled(ds_config: Mapping[str, Any]) -> bool:
    block = ds_config.get("elasticity")
    return isinstance(block, Mapping) and block.get("enabled", False) is True


def compute_elastic_config(
    ds_config: Mapping[str, Any],
    target_deepspeed_version: str,
    world_size: int = 0,
    return_microbatch: bool = False,
) -> tuple:
    """DeepSpeed's ``compute_elastic_config``: ``(train_batch_size, valid_world_sizes)``, plus the
    micro-batch size when ``world_size`` > 0 or ``return_microbatch``; the same answers as DeepSpeed
    for the same block."""
    if version_tuple(target_deepspeed_version) < MINIMUM_DEEPSPEED_VERSION:
        raise ElasticityError(
            f"target DeepSpeed version {target_deepspeed_version} predates elasticity (0.3.8 and later)"
        )
    chosen = elastic_batch(elasticity_of(ds_config), world_size)
    valid = list(chosen.valid_world_sizes)
    if world_size > 0 or return_microbatch:
        return chosen.train_batch_size, valid, chosen.micro_batch_size
    return chosen.train_batch_size, valid
