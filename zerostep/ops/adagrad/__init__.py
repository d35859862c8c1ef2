"""DeepSpeed's ``deepspeed.ops.adagrad.DeepSpeedCPUAdagrad``, over ``zerostep.optim.adagrad``.

DeepSpeed's kernel is torch's Adagrad (no lr decay) when ``weight_decay`` is 0. With weight decay it is
not: the decay enters the squared-gradient sum but not the numerator, which neither torch nor zerostep
computes, so ``weight_decay > 0`` is refused rather than run with other math. ``amsgrad=True`` is
refused too (DeepSpeed ignores it). The state is DeepSpeed's: ``step`` and ``exp_avg_sq`` (the sum).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zerostep.ops.functional_optimizer import FunctionalOptimizer


class DeepSpeedCPUAdagrad(FunctionalOptimizer):
    zerostep_type = "adagrad"
    state_keys = ("exp_avg_sq",)

    def __init__(
        self,
        model_params: Iterable[Any],
        lr: float = 1e-2,
        eps: float = 1e-10,
        weight_decay: float = 0,
        amsgrad: bool = False,
        fp32_optimizer_states: bool = True,
    ):
        if amsgrad:
            raise RuntimeError(
                "DeepSpeedCPUAdagrad does not support the AMSGrad variant (DeepSpeed ignores it)"
            )
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(model_params, defaults, fp32_optimizer_states=fp32_optimizer_states)

    def _hyperparams(self, group: dict[str, Any]) -> dict[str, Any]:
        if group["weight_decay"]:
            raise ValueError(
                f"DeepSpeedCPUAdagrad(weight_decay={group['weight_decay']!r}): DeepSpeed's kernel decays "
                "only the squared-gradient sum, which zerostep does not reproduce; use weight_decay=0, or "
                "torch.optim.Adagrad for L2 decay"
            )
        return dict(lr=group["lr"], eps=group["eps"], weight_decay=0.0)


__all__ = ["DeepSpeedCPUAdagrad"]
