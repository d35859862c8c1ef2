"""``zerostep.zero``: DeepSpeed's ``deepspeed.zero`` names.

- ``GatheredParameters(params, modifier_rank=None, fwd_module=None, enabled=True)``: inside the block,
  stage-3 parameters (placeholders after ``initialize``) hold their full values; with ``modifier_rank``,
  that rank's changes are broadcast and written into the engine's fp32 master and compute shards on exit
  (DeepSpeed's pattern for initializing or editing weights under ZeRO-3). Parameters of stages 0-2 are
  already whole (views of the engine's buffers) and are left alone, as DeepSpeed leaves them.
- ``Init(...)``: accepted with DeepSpeed's arguments; zerostep builds the model in full and partitions
  it when the engine is built, so the block warns that construction-time memory is the full model's.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

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
    """DeepSpeed's ``zero.Init``: accepted; parameters are partitioned by ``initialize``, not here."""

    _warned = False

    def __init__(self, module: Any = None, *args: Any, enabled: bool = True, **kwargs: Any) -> None:
        self.enabled = enabled

    def __enter__(self) -> Init:
        if self.enabled and not Init._warned:
            Init._warned = True
            warnings.warn(
                "zerostep.zero.Init: the model is built in full on each rank and partitioned when "
                "zerostep.initialize builds the engine (construction-time memory is the full model's)",
                stacklevel=2,
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


__all__ = ["GatheredParameters", "Init"]
