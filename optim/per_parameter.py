"""``from_config`` for the optimizers that work per parameter: Muon, mup's three, any torch.optim class.

Each needs to know which parameters the engine's flat shards hold (``param_pieces``); Muon also how to
gather a sharded leaf (``all_gather``, or ``exchange`` for its owner strategy) and whether an LR
schedule sets its lr (``schedule_sets_lr``),
mup the width multipliers the engine reads from the model (``param_widths``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from zerostep.errors import ConfigError
from zerostep.optim.base import Optimizer, PerLeaf
from zerostep.optim.model_parallel import MatrixSplit
from zerostep.optim.muon import muon
from zerostep.optim.muon_shards import Exchange
from zerostep.optim.mup import MUP_TYPES, WidthInfo, mu_optimizer, require_mup
from zerostep.optim.registry import MUON_TYPE
from zerostep.optim.torch_adapter import from_torch_optimizer, torch_optimizer_class

# DeepSpeed's engine passes these to MuonWithAuxAdam's groups; the rest are zerostep's (see optim.muon)
_MUON_KEYS = ("lr", "momentum", "weight_decay", "muon_lr", "ns_method", "betas", "eps", "adam_lr")
_MUON_EXTRA_KEYS = ("nesterov", "ns_steps", "ns_dtype", "adjust_lr_fn", "distributed")
_MUP_KEYS = {
    "muadam": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    "muadamw": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    "musgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
}
_STRING_KEYS = ("ns_method", "ns_dtype", "adjust_lr_fn", "distributed")


def per_parameter_from_config(
    kind: str,
    params: dict[str, Any],
    *,
    param_pieces: PerLeaf = None,
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    exchange: Exchange | None = None,
    schedule_sets_lr: bool = False,
    param_widths: Mapping[str, WidthInfo] | None = None,
    use_triton: bool | None = None,
    lr_multipliers: PerLeaf = None,
    weight_decay_mask: PerLeaf = None,
    split_matrices: Mapping[str, MatrixSplit] | None = None,
) -> Optimizer:
    """The optimizer for type ``kind`` (any case) with the block's ``params``. ``lr_multipliers`` and
    ``weight_decay_mask`` (the engine's param groups) reach every type; ``split_matrices`` (the
    matrices a model-parallel group splits, ``optim.model_parallel``) Muon only."""
    factors = dict(lr_multipliers=lr_multipliers, weight_decay_mask=weight_decay_mask)
    name = kind.lower()
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}  # JSON lists -> tuples
    if name == MUON_TYPE:
        _check_keys(kind, params, (*_MUON_KEYS, *_MUON_EXTRA_KEYS))
        lr = params.pop("lr", None)
        muon_lr = params.pop("muon_lr", None)
        adam_lr = params.pop("adam_lr", None)
        muon_lr = muon_lr if muon_lr is not None else (lr if lr is not None else 0.02)
        adam_lr = adam_lr if adam_lr is not None else (lr if lr is not None else 3e-4)
        return muon(
            muon_lr,
            adam_lr=adam_lr,
            **params,
            schedule_sets_lr=schedule_sets_lr,
            param_pieces=param_pieces,
            all_gather=all_gather,
            exchange=exchange,
            split_matrices=split_matrices,
        )
    if name in MUP_TYPES:
        require_mup(kind)
        _check_keys(kind, params, _MUP_KEYS[name])
        if param_widths is None:
            raise ConfigError(
                f"optimizer.type: {kind!r} needs each parameter's mup width (param_widths), "
                "which the engine reads from the model's `infshape` attributes"
            )
        extra = {"use_triton": use_triton} if name != "musgd" else {}
        return mu_optimizer(name, param_widths, param_pieces=param_pieces, **params, **extra, **factors)
    return from_torch_optimizer(torch_optimizer_class(kind), params, param_pieces=param_pieces, **factors)


def _check_keys(kind: str, params: Mapping[str, Any], accepted: tuple[str, ...]) -> None:
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"optimizer.params: unknown key(s) {unknown} for type {kind!r}; accepted keys are "
            f"{sorted(accepted)}"
        )
    for key, value in params.items():
        if key in _STRING_KEYS:
            if not isinstance(value, str):
                raise ConfigError(f"optimizer.params.{key}: {value!r} is invalid; it must be a string")
        elif key != "betas" and not isinstance(value, (int, float, bool)):
            raise ConfigError(f"optimizer.params.{key}: {value!r} is invalid; it must be a number or boolean")
