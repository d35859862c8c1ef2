"""``zerostep.zero``: DeepSpeed's ``deepspeed.zero`` names.

- ``GatheredParameters(params, modifier_rank=None, fwd_module=None, enabled=True)``: inside the block,
  stage-3 parameters (placeholders after ``initialize``) hold their full values; with ``modifier_rank``,
  that rank's changes are broadcast and written into the engine's fp32 master and compute shards on exit
  (DeepSpeed's pattern for initializing or editing weights under ZeRO-3). Parameters of stages 0-2 are
  already whole (views of the engine's buffers) and are left alone, as DeepSpeed leaves them.
- ``Init(...)``: DeepSpeed's arguments; modules built inside get no memory until ``initialize``
  materializes them a ZeRO unit at a time (core/deferred_init.py), with the values a normal
  construction with the same seed gives.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from zerostep.core.deferred_init import DeferredInit
from zerostep.core.module_binding import gather_released, release_gathered


class GatheredParameters:
    """Context manager: full values for stage-3 parameters inside the block (every rank enters it)."""

    def __init__(
        self,
        params: torch.Tensor | Iterable[torch.Tensor],
        modifier_rank: int | None = None,
        fwd_module: Any = None,
        enabled: bool = True,
    ) -> None:
        self.params = [params] if isinstance(params, torch.Tensor) else [p for p in params if p is not None]
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        self._filled: list[torch.Tensor] = []

    def __enter__(self) -> GatheredParameters:
        if self.enabled:
            self._filled = gather_released(self.params)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._filled:
            filled, self._filled = self._filled, []
            # after an error inside the block, the modification is not written back
            release_gathered(filled, self.modifier_rank if exc[0] is None else None)


class Init:
    """DeepSpeed's ``zero.Init``: modules built inside the block get no memory (meta tensors whose
    construction is recorded, core/deferred_init.py); ``zerostep.initialize`` then materializes them one
    ZeRO unit at a time, keeping only this rank's shard at stage 3, with exactly the values a normal
    construction with the same seed gives (``reset_parameters``, the model's own ``apply(init_fn)``,
    writes through views, tied weights, buffers)."""

    # DeepSpeed's arguments that would change what zerostep builds, and why they do not here
    _NO_EFFECT = {
        "remote_device": "parameter offload is not implemented; the parameters live on the engine's device",
        "pin_memory": "parameter offload is not implemented",
        "dtype": "parameters take the config's compute dtype (fp16 / bf16 blocks) at initialize",
        "zero_quantized_weights": "ZeRO++ quantized weights are not implemented",
        "zero_quantized_nontrainable_weights": "ZeRO++ quantized weights are not implemented",
        "param_swapper": "parameter offload is not implemented",
        "mpu": "model parallelism is not implemented",
        "data_parallel_group": "the engine shards over the default process group at initialize",
        "zero_param_parallel_group": "ZeRO++ hierarchical partitioning is not implemented",
        "sequence_data_parallel_group": "sequence parallelism is not implemented",
    }

    def __init__(
        self,
        module: torch.nn.Module | None = None,
        data_parallel_group: Any = None,
        mem_efficient_linear: bool = True,
        remote_device: str | None = None,
        pin_memory: bool = False,
        config_dict_or_path: Any = None,
        config: Any = None,
        enabled: bool = True,
        dtype: torch.dtype | None = None,
        mpu: Any = None,
        **kwargs: Any,
    ) -> None:
        given = {"remote_device": remote_device, "pin_memory": pin_memory or None, "dtype": dtype, "mpu": mpu}
        given["data_parallel_group"] = data_parallel_group
        given.update({k: v for k, v in kwargs.items() if k in self._NO_EFFECT})
        unknown = sorted(set(kwargs) - set(self._NO_EFFECT))
        if unknown:
            raise TypeError(f"zerostep.zero.Init() got unexpected keyword arguments {unknown}")
        for name, value in given.items():
            if value not in (None, False, "none"):
                warnings.warn(
                    f"zerostep.zero.Init({name}=...) has no effect: {self._NO_EFFECT[name]}", stacklevel=2
                )
        # module=: already built; initialize partitions it, which is what DeepSpeed does to it here
        self.enabled = enabled and module is None
        self._deferred: DeferredInit | None = None

    def __enter__(self) -> Init:
        if self.enabled:
            self._deferred = DeferredInit().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            deferred.__exit__(*exc)


__all__ = ["GatheredParameters", "Init"]
