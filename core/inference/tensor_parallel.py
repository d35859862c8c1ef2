"""Tensor parallelism for inference: AutoTP's policies (``core/autotp.py``) applied with the in-place
transform of ``zerostep.parallel.tensor_parallel`` over all ``tp_size`` ranks.

Every rank holds the same full weights on entry (the same seed, checkpoint or ``from_pretrained``); each
keeps its shard of the planned layers: per block, q/k/v and the MLP's up projections column-wise (its
heads / its slice of the hidden units), the attention output and down projection row-wise (two
all-reduces per block), the token embedding vocab-parallel and the LM head column-parallel with its logits
gathered (one shard for both when tied). Known architectures: zerostep's GPT and Hugging Face GPT-2, OPT,
LLaMA-style; any other through ``injection_policy``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.distributed as dist
from torch import nn

from zerostep.core.autotp import tp_plan
from zerostep.errors import ConfigError
from zerostep.parallel.tensor_parallel import ShardSpec, TPPlan, TPPlanError, plan_specs, shard_module


def checked_plan(model: nn.Module, tp_size: int, injection_policy: Mapping | None = None) -> TPPlan:
    """The plan, checked against the model's shapes (no process group needed): a bad ``tp_size`` or
    policy fails here, before any work."""
    try:
        plan = tp_plan(model, tp_size, injection_policy)
        plan_specs(model, plan, tp_size)
    except (ConfigError, TPPlanError) as e:
        raise ConfigError(f"init_inference: {e}") from None
    return plan


def _tp_group(tp_size: int) -> dist.ProcessGroup:
    from zerostep.parallel.groups import maybe_init_distributed

    if not maybe_init_distributed():
        raise RuntimeError(
            f"init_inference: tensor_parallel.tp_size={tp_size} needs torch.distributed initialized on "
            f"{tp_size} ranks (launch with torchrun or call zerostep.init_distributed first)"
        )
    world = dist.get_world_size()
    if world != tp_size:
        raise ConfigError(
            f"init_inference: tensor_parallel.tp_size={tp_size} must equal the world size {world}"
        )
    return dist.group.WORLD


def apply_tensor_parallel(
    model: nn.Module, tp_size: int, injection_policy: Mapping | None = None
) -> dict[str, ShardSpec]:
    """Shard ``model`` in place over all ``tp_size`` ranks; returns each parameter's ``ShardSpec``."""
    plan = checked_plan(model, tp_size, injection_policy)
    return shard_module(model, plan, _tp_group(tp_size))
