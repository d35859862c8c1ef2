"""``zerostep.checkpointing``: DeepSpeed's ``deepspeed.checkpointing`` names over
``zerostep.core.activation_checkpointing`` (``torch.utils.checkpoint`` without reentrancy, RNG preserved).

    zerostep.checkpointing.configure(mpu, deepspeed_config="ds_config.json")
    hidden = zerostep.checkpointing.checkpoint(block, hidden)

The options mean what DeepSpeed's mean; those without an effect in zerostep warn once when set
(``partition_activations``, ``contiguous_memory_optimization``, ``number_checkpoints``: see
``zerostep.core.config.memory``). An engine built from a config holding an ``activation_checkpointing``
block configures this module with it unless ``configure`` was called first. To checkpoint every block
without wrapping calls, set zerostep's ``"checkpoint_units": true`` in the block.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from zerostep.core import activation_checkpointing as _ac
from zerostep.core.activation_checkpointing import RNGStatesTracker
from zerostep.core.config.memory import (
    ActivationCheckpointingConfig,
    inert_options,
    parse_activation_checkpointing,
)
from zerostep.core.config.values import Block, ConfigWarning, Context

__all__ = [
    "CudaRNGStatesTracker",
    "checkpoint",
    "configure",
    "get_cuda_rng_tracker",
    "is_configured",
    "model_parallel_cuda_manual_seed",
    "reset",
]

CudaRNGStatesTracker = RNGStatesTracker  # DeepSpeed's (and Megatron's) class name
MODEL_PARALLEL_RNG = "model-parallel-rng"


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` with its activations recomputed in backward instead of kept."""
    return _ac.checkpoint(function, *args, settings=_ac.configured_settings(), **kwargs)


def _block_of(deepspeed_config: Any) -> ActivationCheckpointingConfig:
    from zerostep.core.config import Config
    from zerostep.core.config.load import read_config_file

    if isinstance(deepspeed_config, Config):
        return deepspeed_config.activation_checkpointing
    if isinstance(deepspeed_config, (str, os.PathLike)):
        raw = read_config_file(deepspeed_config)
    elif isinstance(deepspeed_config, Mapping):
        raw = deepspeed_config
    else:
        raise TypeError(
            "configure: deepspeed_config must be a config file path, a dict or a zerostep Config, got "
            f"{type(deepspeed_config).__name__}"
        )
    block = Block(dict(raw), "", Context(lambda path: "user")).child("activation_checkpointing")
    with warnings.catch_warnings():  # configure() warns once, knowing the model-parallel size
        warnings.simplefilter("ignore", ConfigWarning)
        return parse_activation_checkpointing(block)


def _model_parallel_size(mpu: Any) -> int:
    for name in ("get_tensor_model_parallel_world_size", "get_model_parallel_world_size"):
        if hasattr(mpu, name):
            return int(getattr(mpu, name)())
    return 1


def configure(
    mpu_: Any,
    deepspeed_config: Any = None,
    partition_activations: bool | None = None,
    contiguous_checkpointing: bool | None = None,
    num_checkpoints: int | None = None,
    checkpoint_in_cpu: bool | None = None,
    synchronize: bool | None = None,
    profile: bool | None = None,
) -> None:
    """Set what ``checkpoint`` does: DeepSpeed's defaults, then ``deepspeed_config``'s
    ``activation_checkpointing`` block, then each argument that is not None."""
    settings = ActivationCheckpointingConfig()
    if mpu_ is not None:
        _ac.CONFIGURED.mpu = mpu_
    if deepspeed_config is not None:
        settings = _block_of(deepspeed_config)
    given = {
        "partition_activations": partition_activations,
        "contiguous_memory_optimization": contiguous_checkpointing,
        "number_checkpoints": num_checkpoints,
        "cpu_checkpointing": checkpoint_in_cpu,
        "synchronize_checkpoint_boundary": synchronize,
        "profile": profile,
    }
    settings = dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})
    if num_checkpoints is not None and (isinstance(num_checkpoints, bool) or int(num_checkpoints) < 1):
        raise ValueError(f"configure: num_checkpoints must be an integer >= 1, got {num_checkpoints!r}")
    mp_size = _model_parallel_size(_ac.CONFIGURED.mpu)
    for message in inert_options(settings, mp_size):
        warnings.warn(f"zerostep.checkpointing.configure: {message}", ConfigWarning, stacklevel=2)
    _ac.CONFIGURED.settings = settings
    _ac.CONFIGURED.model_parallel_size = mp_size


def is_configured() -> bool:
    """Whether ``configure`` was called (or an engine adopted its config's block)."""
    return _ac.CONFIGURED.settings is not None


def reset() -> None:
    """DeepSpeed frees its contiguous checkpoint buffers here (called between evaluation forwards);
    zerostep keeps checkpoints in the caching allocator, so there is nothing to free. The settings
    stay."""


def get_cuda_rng_tracker() -> RNGStatesTracker:
    """The process's named RNG streams; checkpointed regions replay them in the recomputation."""
    return _ac.RNG_TRACKER


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Megatron's seeding as DeepSpeed does it: the default generator gets ``seed`` (the same on every
    tensor-parallel rank), the tracker's model-parallel stream ``seed + 2718 + tensor-parallel rank``."""
    import torch

    mpu = _ac.CONFIGURED.mpu
    tp_rank = 0
    for name in ("get_tensor_model_parallel_rank", "get_model_parallel_rank"):
        if mpu is not None and hasattr(mpu, name):
            tp_rank = int(getattr(mpu, name)())
            break
    _ac.RNG_TRACKER.reset()
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)
    _ac.RNG_TRACKER.add(MODEL_PARALLEL_RNG, seed + 2718 + tp_rank)
