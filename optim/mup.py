"""mup's MuAdam, MuAdamW and MuSGD (Yang et al., "Tensor Programs V"; the ``mup`` package, 1.0).

mup splits each param group by the parameter's ``infshape`` (set by ``mup.set_base_shapes``) and scales
the group's lr and weight decay by width multipliers, then builds torch's Adam, AdamW or SGD:

- MuAdam / MuAdamW: matrix-like parameters (2 infinite dimensions) get ``lr / width_mult`` and
  ``weight_decay * width_mult``; vector-like and fixed ones keep both.
- MuSGD: vector-like (1 infinite dimension) ``lr * width_mult``, ``weight_decay / width_mult``;
  matrix-like ``lr / r`` and ``weight_decay * r`` with ``r = fanin_mult / fanout_mult``; fixed ones keep both.
- More than 2 infinite dimensions: mup raises ``NotImplementedError``; here a ConfigError.

mup's groups default ``weight_decay`` to 0 (so MuAdamW's default is 0, not AdamW's 0.01) and need
``lr`` (mup reads ``kwargs['lr']``). Here the multipliers become per-element tensors over the flat
shards (``param_pieces``), fed to zerostep's own Adam/AdamW/SGD (torch's update exactly) as
``lr_multipliers`` and ``weight_decay_mask``. ``widths`` is what the engine reads from the model's
parameters (``param_widths``); the ``mup`` package is only needed to have set them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import optree
import torch

from zerostep.errors import ConfigError
from zerostep.optim.adam import adam
from zerostep.optim.base import Optimizer, PerLeaf, PyTree, per_leaf
from zerostep.optim.pieces import FlatPieces, resolve_pieces, runs_tensor
from zerostep.optim.sgd import sgd

MUP_TYPES = ("muadam", "muadamw", "musgd")
MUP_INSTALL = "pip install 'zerostep[mup]' (or pip install mup)"


class WidthInfo(NamedTuple):
    """What mup's optimizers read from a parameter's ``infshape``."""

    ninf: int  # number of infinite (width-scaled) dimensions
    width_mult: float
    fanin_fanout_mult_ratio: float  # only meaningful for 2 infinite dimensions


def mup_installed() -> bool:
    return importlib.util.find_spec("mup") is not None


def require_mup(kind: str) -> None:
    """DeepSpeed imports mup for these types and fails without it; so does zerostep, with the fix."""
    if not mup_installed():
        raise ConfigError(
            f"optimizer.type: {kind!r} is mup's optimizer and needs the mup package, which is not "
            f"installed: {MUP_INSTALL}"
        )


def param_widths(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> dict[str, WidthInfo]:
    """Width information per trainable parameter, from the ``infshape`` that ``mup.set_base_shapes`` sets;
    ConfigError (mup's message) for a parameter without one."""
    out = {}
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        info = getattr(p, "infshape", None)
        if info is None:
            raise ConfigError(
                f"parameter {name} of shape {list(p.shape)} has no `infshape` attribute: did you "
                "forget to call `mup.set_base_shapes` on the model? (mup's optimizers need it)"
            )
        ninf = int(info.ninf())
        ratio = float(info.fanin_fanout_mult_ratio()) if ninf == 2 else 1.0
        out[name] = WidthInfo(ninf, float(info.width_mult()), ratio)
    return out


def scaling(kind: str, name: str, w: WidthInfo) -> tuple[float, float]:
    """(lr multiplier, weight decay multiplier) of one parameter, as mup 1.0 groups them."""
    if w.ninf > 2:
        raise ConfigError(
            f"{kind}: parameter {name} has {w.ninf} infinite dimensions; mup supports at most 2"
        )
    if kind == "musgd":
        if w.ninf == 1:
            return w.width_mult, 1.0 / w.width_mult
        if w.ninf == 2:
            return 1.0 / w.fanin_fanout_mult_ratio, w.fanin_fanout_mult_ratio
        return 1.0, 1.0
    if w.ninf == 2:
        return 1.0 / w.width_mult, w.width_mult
    return 1.0, 1.0


def mu_optimizer(
    kind: str,
    widths: Mapping[str, WidthInfo],
    *,
    param_pieces: PerLeaf = None,
    lr_multipliers: PerLeaf = None,
    weight_decay_mask: PerLeaf = None,
    use_triton: bool | None = None,
    **hyper: Any,
) -> Optimizer:
    """``kind`` in ``MUP_TYPES``: zerostep's Adam (L2), AdamW or SGD with mup's per-parameter scaling.
    ``widths``: parameter name -> ``WidthInfo`` (leaves without ``param_pieces`` are named by their
    pytree path); ``hyper``: the torch optimizer's keywords (``lr`` required, as in mup).
    ``lr_multipliers`` / ``weight_decay_mask``: further per-leaf factors (the engine's param groups),
    multiplied with mup's at each step (so factors written in place take effect)."""
    if kind not in MUP_TYPES:
        raise ValueError(f"kind must be one of {MUP_TYPES}, got {kind!r}")
    if "lr" not in hyper:
        raise ConfigError(f"optimizer.params.lr: required by mup's {kind} (it has no default)")
    hyper.setdefault("weight_decay", 0.0)  # mup's param groups default it to 0
    cache: dict[tuple[int, str], tuple[list[Any], list[Any]]] = {}

    def multipliers(params: PyTree) -> tuple[list[Any], list[Any]]:
        """Per leaf: the lr and weight-decay multipliers (python 1.0 where uniform, else [n] fp32)."""
        leaves = optree.tree_leaves(params)
        key = (len(leaves), str(leaves[0].device) if leaves else "")
        if key not in cache:
            lr_mult, wd_mult = [], []
            for leaf, fp in zip(leaves, resolve_pieces(param_pieces, params)):
                lr_runs, wd_runs = _runs(kind, fp, widths)
                lr_mult.append(_leaf_multiplier(lr_runs, leaf))
                wd_mult.append(_leaf_multiplier(wd_runs, leaf))
            cache[key] = (lr_mult, wd_mult)
        return cache[key]

    def tree_of(index: int, user: PerLeaf) -> Any:
        def per_leaf_tree(params: PyTree) -> PyTree:
            spec = optree.tree_structure(params)
            ours = multipliers(params)[index]
            if user is not None:
                ours = [_times(a, b) for a, b in zip(ours, per_leaf(user, params, 1.0))]
            return optree.tree_unflatten(spec, ours)

        return per_leaf_tree

    if kind == "musgd":
        inner = sgd(
            **hyper,
            weight_decay_mask=tree_of(1, weight_decay_mask),
            lr_multipliers=tree_of(0, lr_multipliers),
        )
    else:
        inner = adam(
            **hyper,
            adam_w_mode=kind == "muadamw",
            weight_decay_mask=tree_of(1, weight_decay_mask),
            lr_multipliers=tree_of(0, lr_multipliers),
            use_triton=use_triton,
        )

    def init(params: PyTree) -> Any:
        multipliers(params)  # built here, outside any compiled graph
        return inner.init(params)

    return Optimizer(
        name=kind,
        lr=inner.lr,
        hyperparams=dict(inner.hyperparams),
        init_fn=init,
        apply_fn=inner.apply_fn,
        cycles_momentum=inner.cycles_momentum,
    )


def _times(a: Any, b: Any) -> Any:
    b = float(b) if isinstance(b, bool) else b
    if not isinstance(b, torch.Tensor) and b == 1.0:
        return a
    if not isinstance(a, torch.Tensor) and a == 1.0:
        return b
    return a * b


def _runs(kind: str, fp: FlatPieces, widths: Mapping[str, WidthInfo]):
    lr_runs, wd_runs = [], []
    for piece in fp.pieces:
        w = widths.get(piece.name)
        if w is None:
            raise ConfigError(
                f"{kind}: no width information for parameter {piece.name} (set "
                "`mup.set_base_shapes` on the model)"
            )
        lr_m, wd_m = scaling(kind, piece.name, w)
        lr_runs.append((piece.start, piece.stop, lr_m))
        wd_runs.append((piece.start, piece.stop, wd_m))
    return lr_runs, wd_runs


def _leaf_multiplier(runs: list[tuple[int, int, float]], leaf: torch.Tensor) -> Any:
    """1.0 (the fast static case) when every element's multiplier is 1, else a tensor shaped like the leaf."""
    if all(m == 1.0 for _, _, m in runs):
        return 1.0
    n = leaf.numel()
    return runs_tensor(n, runs, 1.0, torch.float32, leaf.device).view(leaf.shape)
