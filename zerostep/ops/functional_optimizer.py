"""``FunctionalOptimizer``: a ``torch.optim.Optimizer`` whose ``step`` is a ``zerostep.optim`` update.

DeepSpeed's optimizer classes (``FusedAdam``, ``DeepSpeedCPUAdam``, ``FusedLamb``, ``FusedLion``, ...)
are C++/CUDA kernels. Here each is an ordinary torch optimizer over the same math as zerostep's
functional optimizer of that type, so a script's ``FusedAdam`` gives the same values standing alone
(``opt.step()``) as when ``zerostep.initialize`` runs it on the sharded master (``zerostep_spec`` says
which functional optimizer that is).

State follows torch's layout, so ``state_dict()`` / ``load_state_dict()`` work as for ``torch.optim.Adam``
(and a ``torch.optim.Adam`` / ``AdamW`` state loads into ``FusedAdam``): per parameter a 0-d fp32
``step`` on the host and the moments. Moments are fp32 for every parameter dtype unless
``fp32_optimizer_states=False`` (the CPU classes' switch) keeps them in the parameter's dtype; loading a
state dict keeps that choice (torch alone would cast them to the parameter's dtype).

One step: for each group, parameters with a gradient are bucketed by step count and device, and each
bucket is one ``update_`` call of the group's functional optimizer (built from the group's current
hyperparameters, so writing ``lr``, ``betas`` or ``weight_decay`` into a group takes effect next step).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from zerostep import optim as zoptim
from zerostep.errors import ConfigError


class FunctionalOptimizer(torch.optim.Optimizer):
    """Base class. Subclasses set ``zerostep_type`` (a ``zerostep.optim`` factory name), ``state_keys``
    (the moments' names, in the functional state's field order) and ``_hyperparams(group)``."""

    zerostep_type: str = ""
    state_keys: tuple[str, ...] = ()

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], *, fp32_optimizer_states: bool = True
    ):
        super().__init__(params, defaults)
        self.fp32_optimizer_states = fp32_optimizer_states
        self._cache: dict[tuple, zoptim.Optimizer] = {}
        for group in self.param_groups:
            self._functional(group)  # bad hyperparameters fail here, as torch's constructors do

    # -- what subclasses say -------------------------------------------------------------------------
    def _hyperparams(self, group: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of ``zerostep.optim.<zerostep_type>`` for ``group``."""
        raise NotImplementedError

    def zerostep_spec(self, group: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """``(type, kwargs)``: ``getattr(zerostep.optim, type)(**kwargs)`` is the optimizer this one runs
        for ``group`` (default: the constructor's defaults); ``{"type": type, "params": kwargs}`` is the
        same as a DeepSpeed config ``optimizer`` block."""
        source = self.defaults if group is None else {**self.defaults, **group}
        return self.zerostep_type, self._hyperparams(source)

    # -- stepping ------------------------------------------------------------------------------------
    def _functional(self, group: dict[str, Any]) -> zoptim.Optimizer:
        for flag in ("amsgrad", "maximize"):  # e.g. in the groups of a loaded torch.optim.Adam state
            if group.get(flag):
                raise ValueError(f"{type(self).__name__}: {flag}=True is not supported")
        kwargs = self._hyperparams(group)
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
        built = self._cache.get(key)
        if built is None:
            try:
                built = getattr(zoptim, self.zerostep_type)(**kwargs)
            except ConfigError as error:  # name the class and the argument, not a config key
                message = str(error).replace("optimizer.params.", "")
                raise ValueError(f"{type(self).__name__}: {message}") from None
            self._cache[key] = built
        return built

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        if p.dtype == torch.float64 or not self.fp32_optimizer_states:
            return p.dtype
        return torch.float32

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = {"step": torch.zeros((), dtype=torch.float32)}
        for key in self.state_keys:
            state[key] = torch.zeros_like(p, dtype=self._state_dtype(p), memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            functional = self._functional(group)
            buckets: dict[tuple[float, torch.device], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if not p.is_floating_point():
                    raise RuntimeError(
                        f"{type(self).__name__}: parameters must be floating point, not {p.dtype}"
                    )
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                elif not isinstance(state["step"], torch.Tensor):  # e.g. DeepSpeed's int steps
                    state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
                buckets.setdefault((float(state["step"]), p.device), []).append(p)
            for params in buckets.values():
                self._update(functional, group["lr"], params)
        return loss

    def _update(self, functional: zoptim.Optimizer, lr: Any, params: list[torch.Tensor]) -> None:
        states = [self.state[p] for p in params]
        count = states[0]["step"].clone()  # one count for the bucket: every member's step is equal
        moments = [[s[key] for s in states] for key in self.state_keys]
        functional_state = _STATE_TYPES[self.zerostep_type](count, *moments)
        functional.update_([p.grad for p in params], functional_state, params, lr)
        for s in states:
            s["step"].copy_(count)

    # -- state dicts ---------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a torch optimizer's groups lack our keys (bias_correction, ...)
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for index, p in zip(ids, params):
            step = self.state[p].get("step") if p in self.state else None
            if isinstance(step, torch.Tensor):  # torch keeps the caller's tensor; our steps update in place
                self.state[p]["step"] = step.detach().to(torch.float32, copy=True)
            for key in self.state_keys:
                value = saved.get(index, {}).get(key)
                if isinstance(value, torch.Tensor):  # torch cast it to p's dtype; keep the state's own
                    self.state[p][key] = value.to(device=p.device, dtype=self._state_dtype(p), copy=True)


_STATE_TYPES = {
    "adam": zoptim.AdamState,
    "lamb": zoptim.LambState,
    "lion": zoptim.LionState,
    "adagrad": zoptim.AdagradState,
}


def reject_deprecated_step_args(owner: str, **given: Any) -> None:
    """DeepSpeed's fused optimizers refuse ``step()``'s old arguments (grads, scale, ...) the same way."""
    if any(value is not None for value in given.values()):
        raise RuntimeError(
            f"{owner} has been updated. Simply initialize it identically to torch.optim.Adam, and call "
            "step() with no arguments."
        )
