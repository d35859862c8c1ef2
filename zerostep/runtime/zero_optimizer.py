"""The optimizer ``zerostep.initialize`` returns: DeepSpeed's ZeRO optimizer wrapper, as scripts see it.

Its ``param_groups`` are the client optimizer's own list (or, for a config optimizer, one built from
``model_parameters``), so what a script or a torch LR scheduler writes there (``group["lr"] = ...``)
reaches the engine's next update: ``DeepSpeedEngine.step`` reads every group's ``lr`` at the boundary.
The update itself runs in the engine over the sharded fp32 master (``step()`` here points there).

``state_dict()`` holds the groups' hyperparameters; the optimizer's moments belong to the engine's
state and travel in ``engine.save_checkpoint``. ``zero_grad()`` is accepted and does nothing to the
accumulated gradients: they live in the engine and are cleared after every update, as DeepSpeed's ZeRO
optimizers clear their partitions (a ``zero_grad()`` between micro-steps must not drop accumulation).
"""

from __future__ import annotations

from typing import Any

import torch


class ZeroOptimizer(torch.optim.Optimizer):
    """A torch ``Optimizer`` in type (schedulers accept it), whose math runs in the engine."""

    def __init__(self, engine: Any, param_groups: list[dict[str, Any]], basic: torch.optim.Optimizer | None):
        # Share the client's group dicts (not copies): its schedulers write there.
        self._engine = engine
        self.optimizer = basic  # DeepSpeed's name for the wrapped (basic) optimizer
        source = basic.param_groups if basic is not None else param_groups
        defaults = (
            basic.defaults if basic is not None else {k: v for k, v in source[0].items() if k != "params"}
        )
        super().__init__([dict(g) for g in source], defaults)  # torch's hooks and bookkeeping
        if basic is not None:
            self.param_groups = basic.param_groups
        self.state = {}  # torch's per-parameter state: unused (the moments are the engine's)

    def __getstate__(self) -> dict[str, Any]:
        return {"param_groups": self.param_groups, "defaults": self.defaults}

    def __repr__(self) -> str:
        inner = type(self.optimizer).__name__ if self.optimizer is not None else "config optimizer"
        return f"ZeroOptimizer({inner}, groups={len(self.param_groups)})"

    # ---------------------------------------------------------------- torch.optim surface

    def step(self, closure: Any = None) -> None:
        raise RuntimeError(
            "the optimizer returned by zerostep.initialize updates inside the engine: call engine.step() "
            "after engine.backward(loss), as with DeepSpeed"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Accepted for DeepSpeed scripts; gradients are the engine's and are cleared after each update."""

    def state_dict(self) -> dict[str, Any]:
        groups = []
        for group in self.param_groups:
            groups.append({k: _plain(v) for k, v in group.items() if k != "params"})
        return {"param_groups": groups, "zerostep": "moments live in the engine's checkpoint"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            have = len(groups) if isinstance(groups, list) else type(groups).__name__
            raise ValueError(
                f"optimizer state_dict has {have} param groups, this optimizer has {len(self.param_groups)}"
            )
        for mine, saved in zip(self.param_groups, groups):
            for key, value in saved.items():
                if key != "params":
                    mine[key] = tuple(value) if isinstance(value, list) and key == "betas" else value

    # ---------------------------------------------------------------- DeepSpeed's fp16 surface

    @property
    def cur_scale(self) -> float:
        return float(self._engine._stepper.state.scaler.scale)

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    @property
    def overflow(self) -> bool:
        return not self._engine.was_step_applied()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value
