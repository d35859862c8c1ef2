"""``zerostep_optimizer_spec``: which ``zerostep.optim`` optimizer runs a torch optimizer's math.

For ``zerostep.initialize(optimizer=...)``: the engine runs the client optimizer as zerostep's functional
optimizer of the same math over its sharded master. This says which one, per parameter group:
``(type, kwargs)`` with ``getattr(zerostep.optim, type)(**kwargs)`` that optimizer, and
``{"type": type, "params": kwargs}`` the equivalent DeepSpeed config ``optimizer`` block. ``None`` when
there is none: another class, or a torch option zerostep does not compute (``amsgrad``, ``maximize``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def _number(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def zerostep_optimizer_spec(
    opt: torch.optim.Optimizer, group: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]] | None:
    """``(type, kwargs)`` of the zerostep optimizer equal to ``opt`` on ``group`` (default: its first
    group), or ``None``. Covers ``zerostep.ops``' DeepSpeed classes and torch's ``Adam``, ``AdamW``,
    ``SGD`` and ``Adagrad``."""
    from zerostep.ops.functional_optimizer import FunctionalOptimizer

    if group is None:
        group = opt.param_groups[0] if opt.param_groups else opt.defaults
    if isinstance(opt, FunctionalOptimizer):
        return opt.zerostep_spec(dict(group))
    g = {key: _number(value) for key, value in group.items() if key != "params"}
    if g.get("maximize") or g.get("amsgrad") or g.get("differentiable"):
        return None
    kind = type(opt)
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        decoupled = kind is torch.optim.AdamW or bool(g.get("decoupled_weight_decay", False))
        betas = tuple(_number(b) for b in g["betas"])
        return "adam", dict(
            lr=g["lr"],
            betas=betas,
            eps=g["eps"],
            weight_decay=g["weight_decay"],
            adam_w_mode=decoupled,
            bias_correction=True,
        )
    if kind is torch.optim.SGD:
        keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
        return "sgd", {key: g[key] for key in keys}
    if kind is torch.optim.Adagrad:
        keys = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
        return "adagrad", {key: g[key] for key in keys}
    return None
