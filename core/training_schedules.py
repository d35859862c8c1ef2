"""Per-step training schedules applied in the forward: progressive layer drop and the legacy curriculum.

Both are functions of the step count alone, so they need no state of their own: equal states give
equal steps, and a resumed run continues its schedule from the checkpoint's step.

- **Progressive layer drop** (Zhang and He, 2020; DeepSpeed <= 0.17's ``progressive_layer_drop``): the
  model's forward receives ``progressive_layer_drop=True, pld_theta=theta`` as keyword arguments, with
  theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar. DeepSpeed updates theta after each step
  from the step count before that step, so the forward of step ``t`` sees theta(t - 1) (1.0 at the first
  step); ``pld_theta`` here is that value. The model decides what to drop with it.
- **Curriculum learning, legacy block** (``curriculum_learning``, ``curriculum_type: "seqlen"``): every
  tensor leaf of the batch with two or more dimensions is cut to the current difficulty along dimension
  1 (batch, sequence, ...), and the forward receives ``curriculum_seqlen=difficulty`` as DeepSpeed passed
  it (Megatron-style models cut their own inputs with it; a second cut to the same length is a no-op).
  Difficulties are multiples of ``difficulty_step``, so a compiled step compiles once per difficulty.

The keyword arguments reach the model through a forward pre-hook on its top module (only in training
mode, as DeepSpeed), so they work with ``loss_fn(model, batch)``, dict batches and the facade alike.
theta changes every step: a compiled forward would recompile every step, so with PLD the engine runs
forward and backward eagerly (the update stays compiled) and says so.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import optree
import torch
from torch import nn

from zerostep.core.config import Config
from zerostep.core.config.schedules import curriculum_difficulty


def pld_theta(theta: float, gamma: float, global_steps: int) -> float:
    """Keep probability for the forward of the step starting at ``global_steps`` (DeepSpeed's timing)."""
    if global_steps <= 0:
        return 1.0
    return (1.0 - theta) * math.exp(-gamma * (global_steps - 1)) + theta


class TrainingSchedules:
    """The schedules a config turns on, and the hook that hands their keyword arguments to the model."""

    def __init__(self, config: Config, model: nn.Module) -> None:
        self.pld = config.progressive_layer_drop if config.progressive_layer_drop.enabled else None
        self.curriculum = config.curriculum_learning if config.curriculum_learning.enabled else None
        self._kwargs: dict[str, Any] = {}
        self._hook = model.register_forward_pre_hook(self._add_kwargs, with_kwargs=True)

    @classmethod
    def of(cls, config: Config, model: nn.Module) -> TrainingSchedules | None:
        if not (config.progressive_layer_drop.enabled or config.curriculum_learning.enabled):
            return None
        return cls(config, model)

    @property
    def eager_forward(self) -> bool:
        """Whether the forward must run eagerly (PLD's theta is a new float every step)."""
        return self.pld is not None

    def warn_eager(self) -> None:
        warnings.warn(
            "progressive_layer_drop: pld_theta changes every step, so forward and backward run eagerly "
            "(a compiled forward would recompile every step); the optimizer update stays compiled",
            stacklevel=4,
        )

    def theta(self, global_steps: int) -> float | None:
        return None if self.pld is None else pld_theta(self.pld.theta, self.pld.gamma, global_steps)

    def seqlen(self, global_steps: int) -> int | None:
        c = self.curriculum
        if c is None:
            return None
        value = curriculum_difficulty(c, global_steps)
        if c.curriculum_type == "seqlen" and value < 1:
            raise ValueError(
                f"curriculum_learning: the schedule gives sequence length {value} at step {global_steps} "
                f"(min_difficulty {c.min_difficulty} rounded down to a multiple of difficulty_step); make "
                "min_difficulty a multiple of schedule_config.difficulty_step"
            )
        return value

    def kwargs_at(self, global_steps: int) -> dict[str, Any]:
        """The keyword arguments DeepSpeed passes to the forward of the step at ``global_steps``."""
        out: dict[str, Any] = {}
        if self.pld is not None:
            out.update(progressive_layer_drop=True, pld_theta=self.theta(global_steps))
        if self.curriculum is not None and self.curriculum.curriculum_type == "seqlen":
            out["curriculum_seqlen"] = self.seqlen(global_steps)
        return out

    def cut(self, global_steps: int, batch: Any) -> Any:
        """The batch cut to the curriculum's sequence length for the step at ``global_steps``."""
        if self.curriculum is None or self.curriculum.curriculum_type != "seqlen":
            return batch
        return truncate_sequences(batch, self.seqlen(global_steps))

    @contextlib.contextmanager
    def forward_kwargs(self, global_steps: int) -> Iterator[None]:
        """Within: the model's training forwards receive this step's keyword arguments."""
        self._kwargs = self.kwargs_at(global_steps)
        try:
            yield
        finally:
            self._kwargs = {}

    def _add_kwargs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self._kwargs or not module.training:
            return None
        return args, {**kwargs, **self._kwargs}

    def close(self) -> None:
        self._hook.remove()


def truncate_sequences(batch: Any, seqlen: int) -> Any:
    """Every tensor leaf with >= 2 dimensions cut to ``seqlen`` along dimension 1 (views, no copies)."""

    def cut(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] > seqlen:
            return x[:, :seqlen]
        return x

    return optree.tree_map(cut, batch)
