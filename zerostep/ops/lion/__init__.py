"""DeepSpeed's Lion classes, ``deepspeed.ops.lion``: ``FusedLion`` and ``DeepSpeedCPULion``, over
``zerostep.optim.lion`` (DeepSpeed's defaults: lr 1e-3, betas (0.9, 0.999), weight_decay 0)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zerostep.ops.functional_optimizer import FunctionalOptimizer, reject_deprecated_step_args


class _Lion(FunctionalOptimizer):
    zerostep_type = "lion"
    state_keys = ("exp_avg",)

    def _hyperparams(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr=group["lr"], betas=tuple(group["betas"]), weight_decay=group["weight_decay"])


class FusedLion(_Lion):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        set_grad_none: bool = True,
    ):
        self.set_grad_none = set_grad_none
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)

    def step(
        self,
        closure: Any = None,
        grads: Any = None,
        output_params: Any = None,
        scale: Any = None,
        grad_norms: Any = None,
        grad_scaler: Any = None,
    ) -> Any:
        reject_deprecated_step_args(
            "FusedLion", grads=grads, output_params=output_params, scale=scale, grad_norms=grad_norms
        )
        return super().step(closure)


class DeepSpeedCPULion(_Lion):
    """``fp32_optimizer_states=False`` keeps the momentum in the parameters' dtype."""

    def __init__(
        self,
        model_params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0,
        fp32_optimizer_states: bool = True,
    ):
        super().__init__(
            model_params,
            dict(lr=lr, betas=betas, weight_decay=weight_decay),
            fp32_optimizer_states=fp32_optimizer_states,
        )


__all__ = ["DeepSpeedCPULion", "FusedLion"]
