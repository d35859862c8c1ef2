"""DeepSpeed's Adam classes, ``deepspeed.ops.adam``: ``FusedAdam`` and ``DeepSpeedCPUAdam``.

Constructor arguments and defaults are DeepSpeed 0.19's; the update is ``zerostep.optim.adam`` (torch's
order of operations; DeepSpeed's kernels compute the same values). ``adam_w_mode`` (default on) is
decoupled weight decay (AdamW), off is L2 decay added to the gradient; ``bias_correction`` is per group.
Both refuse ``amsgrad=True`` (DeepSpeed's CPU Adam silently ignores it). Differences from DeepSpeed:
moments are fp32 for fp16/bf16 parameters (DeepSpeed's ``FusedAdam`` keeps them in the parameter's
dtype), each parameter's ``step`` counts its own updates (DeepSpeed's ``FusedAdam`` advances only the
last one's), and ``DeepSpeedCPUAdam`` also runs on GPU tensors (DeepSpeed's asserts CPU).

``zerostep_optimizer_spec(opt)`` maps an instance (or a torch ``Adam``/``AdamW``/``SGD``/``Adagrad``) onto
zerostep's functional optimizer: the engine runs that over its sharded master.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zerostep.ops.functional_optimizer import FunctionalOptimizer, reject_deprecated_step_args
from zerostep.ops.spec import zerostep_optimizer_spec


class _Adam(FunctionalOptimizer):
    zerostep_type = "adam"
    state_keys = ("exp_avg", "exp_avg_sq")

    def _hyperparams(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            lr=group["lr"],
            betas=tuple(group["betas"]),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            adam_w_mode=bool(self.adam_w_mode),
            bias_correction=bool(group["bias_correction"]),
        )


class FusedAdam(_Adam):
    """DeepSpeed's ``FusedAdam`` (apex's): Adam, or AdamW with ``adam_w_mode`` (the default)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        adam_w_mode: bool = True,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        set_grad_none: bool = True,
    ):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        self.adam_w_mode = 1 if adam_w_mode else 0  # DeepSpeed's (an int)
        self.set_grad_none = set_grad_none
        defaults = dict(
            lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay
        )
        super().__init__(params, defaults)

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Gradients to ``None`` when ``set_grad_none`` (DeepSpeed's switch), else to zero."""
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
            "FusedAdam", grads=grads, output_params=output_params, scale=scale, grad_norms=grad_norms
        )
        return super().step(closure)


class DeepSpeedCPUAdam(_Adam):
    """DeepSpeed's ``DeepSpeedCPUAdam`` (ZeRO-Offload's host Adam): AdamW unless ``adamw_mode=False``.

    ``fp32_optimizer_states=False`` keeps the moments in the parameters' dtype."""

    optimizer_id = 0

    def __init__(
        self,
        model_params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        adamw_mode: bool = True,
        fp32_optimizer_states: bool = True,
    ):
        if amsgrad:
            raise RuntimeError(
                "DeepSpeedCPUAdam does not support the AMSGrad variant (DeepSpeed ignores the flag)"
            )
        self.adam_w_mode = adamw_mode
        self.opt_id = DeepSpeedCPUAdam.optimizer_id
        DeepSpeedCPUAdam.optimizer_id += 1
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            amsgrad=amsgrad,
        )
        super().__init__(model_params, defaults, fp32_optimizer_states=fp32_optimizer_states)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)

    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            if group.get("amsgrad"):
                raise RuntimeError("DeepSpeedCPUAdam does not support the AMSGrad variant")
        return super().step(closure)


__all__ = ["DeepSpeedCPUAdam", "FusedAdam", "zerostep_optimizer_spec"]
