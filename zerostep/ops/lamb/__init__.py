"""DeepSpeed's ``deepspeed.ops.lamb.FusedLamb``, over ``zerostep.optim.lamb``.

One trust ratio per parameter, clamped to ``[min_coeff, max_coeff]``, as DeepSpeed's kernel.
``max_grad_norm`` (FusedLamb's own clipping, which DeepSpeed applies only when ``step`` is handed the
gradient norms) must stay 0: clip with the config's ``gradient_clipping`` instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zerostep.ops.functional_optimizer import FunctionalOptimizer


class FusedLamb(FunctionalOptimizer):
    zerostep_type = "lamb"
    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
        amsgrad: bool = False,
    ):
        if amsgrad:
            raise RuntimeError("FusedLamb does not support the AMSGrad variant.")
        if max_grad_norm:
            raise ValueError(
                f"FusedLamb(max_grad_norm={max_grad_norm!r}): not supported; clip with the config's "
                "'gradient_clipping' (zerostep.initialize) or torch.nn.utils.clip_grad_norm_"
            )
        self.eps_mode = 0 if eps_inside_sqrt else 1  # DeepSpeed's
        self.lamb_coeffs: list[float] = []
        defaults = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            max_coeff=max_coeff,
            min_coeff=min_coeff,
        )
        super().__init__(params, defaults)

    def _hyperparams(self, group: dict[str, Any]) -> dict[str, Any]:
        if group.get("max_grad_norm"):
            raise ValueError("FusedLamb: max_grad_norm must be 0; clip with 'gradient_clipping' instead")
        return dict(
            lr=group["lr"],
            betas=tuple(group["betas"]),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction=bool(group["bias_correction"]),
            eps_inside_sqrt=self.eps_mode == 0,
            max_coeff=group["max_coeff"],
            min_coeff=group["min_coeff"],
        )

    def step(
        self,
        closure: Any = None,
        grads: Any = None,
        output_params: Any = None,
        scale: Any = None,
        grad_norms: Any = None,
    ) -> Any:
        if (
            grads is not None
            or output_params is not None
            or grad_norms is not None
            or scale not in (None, 1.0)
        ):
            raise RuntimeError("FusedLamb.step: grads / output_params / scale / grad_norms are not supported")
        return super().step(closure)


__all__ = ["FusedLamb"]
