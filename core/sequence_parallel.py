"""The engine's side of ``sequence_parallel_size`` (DeepSpeed-Ulysses; the machinery is parallel/ulysses.py).

What the config key changes, and where:

- the batch triple counts ``world / sequence_parallel_size`` data-parallel replicas (core/config);
- gradients are still reduced, and ZeRO still shards, over every rank (DeepSpeed's
  ``seq_data_parallel_group`` is the world without tensor or pipeline parallelism), but the update divides
  their sum by the data-parallel size instead of the world (``StepPlan.unscale``), as DeepSpeed does:
  each rank's loss is its sequence group's loss, whose gradient reaches only this rank's positions, so
  the sum over a group is that loss's gradient and the average over replicas the batch's;
- the reported loss is the mean over ranks of those group losses, i.e. over replicas;
- the sequence-parallel groups exist (the model usually made them already, to build its attention;
  ``setup`` finds them again or makes them), for the facade's ``seq_parallel_group`` and DeepSpeed's
  ``groups._get_sequence_parallel_group``.

``initialize(mesh_param=(dp, sp))`` (DeepSpeed's ``("data_parallel", "sequence_parallel")`` device mesh,
row-major: the ``sp`` ranks of a sequence group consecutive, data parallelism strided across them) is the
same layout: ``mesh_param_config`` writes it into the config as ``data_parallel_size`` and
``sequence_parallel_size`` (DeepSpeed's engine reads its mesh the same way from those two keys), and the
config checks that ``dp x sp`` is the world.

With AutoTP (``tensor_parallel.autotp_size = N``) the sequence groups are strided by N inside each
block of ``N x P`` ranks (``parallel/mesh.sequence_tensor_layout``, Megatron's tp-cp-dp order), so the
TP mesh's data-parallel group (all ranks of one TP rank) is the sequence-and-data group: the engine
reduces, shards and divides over it unchanged, and a model that builds its own groups must be told N
(``GPTConfig(tensor_parallel_size=N)``). An ``mpu`` with sequence parallelism is refused.

What it cannot combine with, each a clear error: 1-bit optimizers (their compressed momentum is averaged
over the world), pipelines (core/pipeline_engine.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from zerostep import optim
from zerostep.core.config import Config
from zerostep.parallel import ulysses


def check(config: Config, optimizer_name: str | None, over_the_world: bool = True) -> None:
    """Local checks (no collective): raises where the config's sequence parallelism cannot run.
    ``over_the_world``: the engine's data-parallel group is every rank (no AutoTP, no mpu)."""
    sp = config.sequence_parallel_size
    if sp == 1:
        return
    tp = config.tensor_parallel.size
    if not over_the_world and tp == 1:
        raise NotImplementedError(
            f"sequence_parallel_size={sp} with mpu=: not implemented by zerostep (the sequence groups "
            "would have to be laid out inside the mpu's data-parallel groups); AutoTP "
            "(tensor_parallel.autotp_size) combines with it"
        )
    ulysses.check_sp_size(sp, config.world_size)  # Config checked it too; a hand-built one may not be
    if optimizer_name is not None and optimizer_name.lower() in optim.COMPRESSED_OPTIMIZER_TYPES:
        raise NotImplementedError(
            f"sequence_parallel_size={sp} with the {optimizer_name} optimizer: not implemented by zerostep "
            "(its compressed momentum is averaged over every rank, not over the data-parallel replicas)"
        )
    if str(config.compute_dtype) != "torch.float32":
        # seq_parallel_communication_data_type other than its default fp32 warns in core/config/features.py
        warnings.warn(
            f"sequence_parallel_size={sp}: DeepSpeed reduces sequence-parallel gradients in "
            "seq_parallel_communication_data_type (default fp32); zerostep reduces them in the compute "
            f"dtype {config.compute_dtype}, like all gradients",
            stacklevel=4,
        )


def setup(config: Config) -> ulysses.SequenceGroups | None:
    """This rank's sequence-parallel groups for the config (collective on first creation: every rank
    calls it, after the ranks agreed on the config), or None without sequence parallelism."""
    if config.sequence_parallel_size == 1:
        return None
    return ulysses.initialize_sequence_parallel(config.sequence_parallel_size, config.tensor_parallel.size)



def mesh_param_config(config: Mapping[str, Any], mesh_param: Any, mpu: Any = None) -> dict[str, Any]:
    """The config dict with ``initialize(mesh_param=(dp, sp))`` written in as ``data_parallel_size`` /
    ``sequence_parallel_size``; a clear error for a malformed pair, one that contradicts the config's own
    keys, or one combined with ``mpu=`` (two sources of the groups)."""
    shape = tuple(mesh_param) if isinstance(mesh_param, (tuple, list)) else None
    if (
        shape is None
        or len(shape) != 2
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape)
    ):
        raise ValueError(
            f"initialize(mesh_param={mesh_param!r}): must be a (data_parallel_size, sequence_parallel_size) "
            "pair of positive integers, as DeepSpeed's device mesh"
        )
    if mpu is not None:
        raise ValueError("initialize: pass either mpu= or mesh_param=, not both (each gives the groups)")
    out = dict(config)
    for key, value in zip(("data_parallel_size", "sequence_parallel_size"), shape):
        if key in out and out[key] != value:
            raise ValueError(
                f"initialize(mesh_param={mesh_param!r}) says {key} = {value} but the config says "
                f"{out[key]!r}; give one of them"
            )
        out[key] = value
    return out
