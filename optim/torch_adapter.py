"""Any ``torch.optim.Optimizer`` as a functional optimizer over the engine's fp32 master shards.

DeepSpeed falls back to ``getattr(torch.optim, type)(params, **params)`` for every type name it does not
know (``"RMSprop"``, ``"NAdam"``, ``"RAdam"``, ``"Adamax"``, ``"ASGD"``, ``"Adadelta"``, ``"Rprop"``,
``"Adafactor"``...), and runs a client's own optimizer on its fp32 partitions. ``from_torch_optimizer``
does both here: each step it builds the torch optimizer over the leaves (or, given ``param_pieces``,
over each parameter's piece of a flat leaf, as a view), hands it the state tensors it keeps in the
functional state as views too, assigns the gradients and calls ``step()``. The torch optimizer's own
code runs, so its results are its results.

State. What the torch optimizer keeps per parameter is stored by kind: tensors shaped like the
parameter in ``tensors[key]`` (one buffer shaped like each leaf, so flat ZeRO shards checkpoint and
reshard like every other optimizer's), scalars (``step``, 0-d tensors or python numbers) once per leaf
in ``scalars[key]`` (every piece of a leaf steps together, so they agree; an optimizer whose pieces
disagree is refused), and anything else (Adafactor's factored row/column variances) per piece in
``others[key]``, which only a leaf that is not sharded may have. The structure comes from a trial step
at ``init`` on copies; the values come from the torch optimizer's own lazy initialization at the first
real step (with that step's gradients and learning rate), as in torch.

Caveat under ZeRO. Elementwise optimizers (RMSprop, NAdam, RAdam, Adamax, ASGD, Adadelta, Rprop,
Adagrad, SGD, Adam...) give the same result on any sharding. An optimizer that looks across a
parameter (a norm, a factorization, a matrix function: Adafactor, torch.optim.Muon, LARS-like ones)
sees whole parameters only where a parameter is not split: at stage 0 or on one rank pieces are handed
in the parameter's shape; on sharded leaves every piece is handed flat (1-D) and a parameter cut by a
shard boundary is seen as two vectors on two ranks. zerostep's Muon gathers whole matrices instead.

Learning rate. ``update``'s lr drives the optimizer; param groups with their own ``lr``
(``param_hyperparams``) keep their ratio to the base lr, as a torch ``LambdaLR`` would.

Under ``torch.compile`` (the engine's graph B) the step runs as one opaque custom op
(``zerostep::torch_optimizer_step``) that mutates the params and state in place.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import optree
import torch

from zerostep.errors import ConfigError
from zerostep.optim.base import (
    Optimizer,
    PerLeaf,
    PyTree,
    Scalar,
    StepOptions,
    compute_view,
    finish_param,
    leaves_like,
    per_leaf,
    prepared_grad,
    state_dtype,
)
from zerostep.optim.pieces import ParamPiece, resolve_pieces

# Classes the adapter cannot run: they need something no flat shard has.
REFUSED = {
    "LBFGS": "it needs a closure that re-evaluates the loss (step(closure)); zerostep's step has none",
    "SparseAdam": "it needs sparse gradients; zerostep's gradients are dense flat shards",
}
_REFUSED_KEYS = {
    "differentiable": "the update runs without autograd",
    "params": "the parameters are the engine's",
}


class TorchOptimizerState(NamedTuple):
    initialized: torch.Tensor  # 0-d int64 (cpu): 1 once the torch optimizer initialized its state
    tensors: dict[str, PyTree]  # key -> tree like the params: state shaped like each leaf's parameters
    scalars: dict[str, PyTree]  # key -> tree like the params: one 0-d tensor per leaf
    others: dict[str, PyTree]  # key -> tree like the params: {piece index: tensor} per leaf


def torch_optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    """Every ``torch.optim`` optimizer class, by lower-case name."""
    out = {}
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
        ):
            out[name.lower()] = obj
    return out


def torch_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """``torch.optim``'s class called ``name`` (case-insensitive); ConfigError naming the close ones."""
    classes = torch_optimizer_classes()
    cls = classes.get(name.lower())
    if cls is None:
        close = difflib.get_close_matches(name.lower(), list(classes), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(classes[c].__name__ for c in close)}?" if close else ""
        raise ConfigError(f"optimizer.type: {name!r} is not a torch.optim optimizer{hint}")
    return cls


def torch_param_hyperparams(
    optimizer: torch.optim.Optimizer, named_parameters: Mapping[str, torch.Tensor] | Any
) -> dict[str, dict[str, Any]]:
    """Per parameter name, the hyperparameters of the ``optimizer`` instance's param group holding it
    (for ``from_torch_optimizer(instance, param_hyperparams=...)``). Parameters in no group are left out."""
    named = dict(named_parameters)
    by_id = {id(t): n for n, t in named.items()}
    out = {}
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for t in group["params"]:
            if id(t) in by_id:
                out[by_id[id(t)]] = hyper
    return out


def from_torch_optimizer(
    optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
    hyperparams: Mapping[str, Any] | None = None,
    *,
    param_hyperparams: Mapping[str, Mapping[str, Any]] | None = None,
    param_pieces: PerLeaf = None,
    lr_multipliers: PerLeaf = None,
    weight_decay_mask: PerLeaf = None,
    name: str | None = None,
) -> Optimizer:
    """A functional ``Optimizer`` that runs ``optimizer`` (a ``torch.optim.Optimizer`` subclass, or an
    instance: its class and ``defaults``) on pytrees of tensors or on the engine's flat shards.

    ``hyperparams``: constructor keywords (override an instance's defaults). ``param_hyperparams``:
    parameter name -> keywords of its own param group (e.g. ``{"fc.bias": {"weight_decay": 0.0}}``; see
    ``torch_param_hyperparams``). ``param_pieces``: per leaf, a ``FlatPieces`` (the engine passes them);
    leaves without one are one parameter each, named by their pytree path. ``lr_multipliers`` and
    ``weight_decay_mask`` (per leaf: numbers, or tensors constant over each parameter, as the engine's
    param groups give) scale each parameter's group lr and weight decay. A given instance is not
    stepped and its state is not read: the functional state starts fresh."""
    if isinstance(optimizer, torch.optim.Optimizer):
        cls = type(optimizer)
        base = {k: v for k, v in optimizer.defaults.items() if k not in _REFUSED_KEYS}
        hyper = {**base, **dict(hyperparams or {})}
    elif isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        cls, hyper = optimizer, dict(hyperparams or {})
    else:
        raise TypeError(f"expected a torch.optim.Optimizer subclass or instance, got {optimizer!r}")
    label = name or cls.__name__
    _check_runnable(cls, hyper)
    defaults = _probe(cls, hyper, label).defaults
    per_name = {n: dict(h) for n, h in (param_hyperparams or {}).items()}
    for n, h in per_name.items():
        bad = sorted(set(h) - set(defaults) - {"name"})
        if bad:
            raise ConfigError(
                f"param group hyperparameters for {n!r}: unknown key(s) {bad} for {label}; "
                f"accepted keys are {sorted(defaults)}"
            )
    base_lr = _as_float(defaults.get("lr", 0.0))
    adapter = _Adapter(
        cls, dict(hyper), defaults, per_name, param_pieces, label, base_lr, lr_multipliers, weight_decay_mask
    )
    return Optimizer(
        name=label.lower(),
        lr=base_lr,
        hyperparams=dict(hyper),
        init_fn=adapter.init,
        apply_fn=adapter.apply,
        cycles_momentum="betas" in defaults,  # DeepSpeed's OneCycle cycles betas only
    )


def refused_reason(name: str) -> str | None:
    """Why the torch.optim class ``name`` (any case) cannot run on zerostep's flat shards, as a
    sentence naming it, or None for a class that can."""
    for cls_name, why in REFUSED.items():
        if cls_name.lower() == name.lower():
            return f"torch.optim.{cls_name} cannot run in zerostep: {why}"
    return None


def _check_runnable(cls: type, hyper: Mapping[str, Any]) -> None:
    if cls.__name__ in REFUSED and cls.__module__.startswith("torch.optim"):
        raise ConfigError(f"optimizer.type: {refused_reason(cls.__name__)}")
    closure = inspect.signature(cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ConfigError(
            f"optimizer.type: {cls.__name__}.step requires a closure, which zerostep's step cannot give"
        )
    for key, why in _REFUSED_KEYS.items():
        if key in hyper:
            raise ConfigError(f"optimizer.params.{key}: not supported for {cls.__name__} ({why})")


def _probe(cls: type, hyper: Mapping[str, Any], label: str) -> torch.optim.Optimizer:
    """An instance over one dummy tensor: validates the keywords as the constructor does."""
    try:
        return cls([torch.zeros(1)], **hyper)
    except TypeError as err:
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
        unknown = [k for k in hyper if k not in accepted]
        if unknown:
            raise ConfigError(
                f"optimizer.params: unknown key(s) {sorted(unknown)} for {label}; accepted keys "
                f"are {sorted(accepted)}"
            ) from err
        raise ConfigError(f"optimizer.params: {label} rejected its parameters: {err}") from err
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"optimizer.params: {label} rejected its parameters: {err}") from err


def _as_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class _Recording(dict):
    """A torch optimizer's per-parameter state dict that remembers the first value set for each key
    (the value of its lazy initialization, before the step's in-place updates)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.first = {k: _snapshot(v) for k, v in self.items()}

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self.first:
            self.first[key] = _snapshot(value)
        super().__setitem__(key, value)


def _snapshot(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


class _Kind(NamedTuple):
    """How one state key is stored: where, and for python-number scalars the type to hand back."""

    where: str  # "tensors", "scalars" or "others"
    pytype: type | None  # int/float/bool for python-number scalars, None for tensors


class _LeafSetup(NamedTuple):
    pieces: tuple[ParamPiece, ...]
    shaped: bool  # hand whole pieces in their parameter's shape (the leaf is not sharded)
    groups: tuple[tuple[tuple[int, ...], dict[str, Any]], ...]  # (piece positions, their hyperparams)


_ADAPTERS: weakref.WeakValueDictionary[int, _Adapter] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


class _Adapter:
    def __init__(
        self, cls, hyper, defaults, per_name, param_pieces, label, base_lr, lr_mult, wd_mask
    ) -> None:
        self.cls, self.hyper, self.defaults, self.per_name = cls, hyper, defaults, per_name
        self.param_pieces, self.label, self.base_lr = param_pieces, label, base_lr
        self.lr_multipliers, self.weight_decay_mask = lr_mult, wd_mask
        self.kinds: dict[str, _Kind] = {}
        self.piece_keys: list[list[frozenset[str]]] = []  # per leaf and piece: its state's keys
        self.state_spec: Any = None
        self.params_spec: Any = None
        self.setups_cache: dict[tuple[int, ...], list[_LeafSetup]] = {}
        self.handle = next(_HANDLES)
        _ADAPTERS[self.handle] = self

    def setups(self, params: PyTree) -> list[_LeafSetup]:
        """Per leaf: its pieces and their param groups (by ``param_hyperparams``), built once."""
        key = tuple(leaf.numel() for leaf in optree.tree_leaves(params))
        if key not in self.setups_cache:
            out = []
            for fp in resolve_pieces(self.param_pieces, params):
                positions: dict[tuple, list[int]] = {}
                hypers: dict[tuple, dict[str, Any]] = {}
                for j, piece in enumerate(fp.pieces):
                    h = {k: v for k, v in self.per_name.get(piece.name, {}).items() if k != "name"}
                    frozen = tuple(sorted((k, repr(v)) for k, v in h.items()))
                    positions.setdefault(frozen, []).append(j)
                    hypers[frozen] = h
                groups = tuple((tuple(ix), hypers[k]) for k, ix in positions.items())
                out.append(_LeafSetup(fp.pieces, not fp.sharded, groups))
            self.setups_cache[key] = out
        return self.setups_cache[key]

    @staticmethod
    def view(setup: _LeafSetup, flat: torch.Tensor, j: int) -> torch.Tensor:
        """Piece ``j`` of a flattened leaf (or of a state buffer shaped like it): its parameter's shape
        when the piece is whole and the leaf not sharded, else 1-D."""
        p = setup.pieces[j]
        v = flat[p.start : p.stop]
        return v.view(p.shape) if setup.shaped and p.whole else v

    def build(
        self,
        setup: _LeafSetup,
        views: list[torch.Tensor],
        lr: float,
        factors: list[tuple[float, float]] | None,
    ) -> torch.optim.Optimizer:
        """The torch optimizer over ``views``: one param group per distinct hyperparameters, and with
        ``factors`` (per piece: lr and weight-decay factors) one per distinct factors as well."""
        groups = []
        for positions, h in setup.groups:
            by_factor: dict[tuple[float, float], list[int]] = {}
            for j in positions:
                by_factor.setdefault(factors[j] if factors else (1.0, 1.0), []).append(j)
            for (lr_f, wd_f), members in by_factor.items():
                group = {"params": [views[j] for j in members], **h}
                if "lr" in self.defaults:
                    ratio = _as_float(h["lr"]) / self.base_lr if "lr" in h and self.base_lr > 0 else 1.0
                    group["lr"] = lr * ratio * lr_f
                if wd_f != 1.0:
                    if "weight_decay" not in self.defaults:
                        raise ValueError(f"{self.label} has no weight_decay to scale per parameter group")
                    group["weight_decay"] = (
                        _as_float(h.get("weight_decay", self.defaults["weight_decay"])) * wd_f
                    )
                groups.append(group)
        return self.cls(groups, **self.hyper)

    def piece_factors(self, works: list[torch.Tensor], setups: list[_LeafSetup]) -> list[Any]:
        """Per leaf, None or per piece the (lr, weight decay) factors of ``lr_multipliers`` and
        ``weight_decay_mask`` (read at the piece's first element: they are constant per parameter)."""
        if self.lr_multipliers is None and self.weight_decay_mask is None:
            return [None] * len(works)
        tree = optree.tree_unflatten(self.params_spec, works)
        mults = per_leaf(self.lr_multipliers, tree, 1.0)
        masks = per_leaf(self.weight_decay_mask, tree, 1.0)
        out = []
        for setup, mult, mask in zip(setups, mults, masks):
            out.append([(_factor_at(mult, p.start), _factor_at(mask, p.start)) for p in setup.pieces])
        return out

    # ------------------------------------------------------------------ init

    def init(self, params: PyTree) -> TorchOptimizerState:
        """The state's structure from a trial step on copies with zero gradients (values are zeros until
        the first real step initializes them)."""
        leaves = optree.tree_leaves(params)
        setups = self.setups(params)
        kinds: dict[str, _Kind] = {}
        firsts: list[list[dict[str, Any]]] = []
        for leaf, setup in zip(leaves, setups):
            work = leaf.detach().to(state_dtype(leaf)).clone().reshape(-1)
            views = [self.view(setup, work, j) for j in range(len(setup.pieces))]
            for v in views:
                v.grad = torch.zeros_like(v)
            opt = self.build(setup, views, self.base_lr, None)
            records = [_Recording(opt.state.get(v, {})) for v in views]
            for v, rec in zip(views, records):
                opt.state[v] = rec
            try:
                opt.step()
            except Exception as err:
                raise ConfigError(f"{self.label} failed a trial step on zero gradients: {err}") from err
            firsts.append([rec.first for rec in records])
            for rec, v, piece in zip(records, views, setup.pieces):
                for k, value in rec.first.items():
                    kind = self.classify(k, value, v, setup, piece)
                    if kinds.setdefault(k, kind) != kind:
                        raise ConfigError(
                            f"{self.label} keeps state {k!r} as {kinds[k].where} for some "
                            f"parameters and as {kind.where} for others; zerostep cannot store it"
                        )
        self.kinds = kinds
        self.piece_keys = [[frozenset(f) for f in leaf_firsts] for leaf_firsts in firsts]
        fields: dict[str, dict[str, list[Any]]] = {"tensors": {}, "scalars": {}, "others": {}}
        for k, kd in sorted(kinds.items()):
            fields[kd.where][k] = []
        for leaf, setup, leaf_firsts in zip(leaves, setups, firsts):
            for k in fields["tensors"]:
                dtype = next((f[k].dtype for f in leaf_firsts if k in f), state_dtype(leaf))
                fields["tensors"][k].append(torch.zeros(leaf.shape, dtype=dtype, device=leaf.device))
            for k in fields["scalars"]:
                value = next((f[k] for f in leaf_firsts if k in f), 0.0)
                fields["scalars"][k].append(torch.zeros_like(_scalar_tensor(value)))
            for k in fields["others"]:
                fields["others"][k].append(
                    {
                        str(p.index): torch.zeros_like(f[k])
                        for p, f in zip(setup.pieces, leaf_firsts)
                        if k in f
                    }
                )
        spec = self.params_spec = optree.tree_structure(params)
        trees = {
            where: {k: optree.tree_unflatten(spec, v) for k, v in d.items()} for where, d in fields.items()
        }
        state = TorchOptimizerState(torch.zeros((), dtype=torch.int64), **trees)
        self.state_spec = optree.tree_structure(state)
        return state

    def classify(
        self, key: str, value: Any, view: torch.Tensor, setup: _LeafSetup, piece: ParamPiece
    ) -> _Kind:
        if isinstance(value, (bool, int, float)):
            return _Kind("scalars", type(value))
        if not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"{self.label} keeps state {key!r} of type {type(value).__name__}; zerostep "
                "stores only tensors and numbers"
            )
        if value.dim() > 0 and value.shape == view.shape:
            return _Kind("tensors", None)
        if value.dim() == 0:
            return _Kind("scalars", None)
        if not setup.shaped:
            raise ConfigError(
                f"{self.label} keeps state {key!r} of shape {list(value.shape)} for a piece of "
                f"{piece.name} of shape {list(view.shape)}: state not shaped like its parameter cannot be "
                "sharded; use ZeRO stage 0 or one rank for this optimizer"
            )
        return _Kind("others", None)

    # ------------------------------------------------------------------ step

    def apply(
        self, grads: PyTree, state: TorchOptimizerState, params: PyTree, lr: Scalar, opts: StepOptions
    ) -> None:
        p_leaves, (g_leaves,) = leaves_like(params, grads)
        c_leaves = per_leaf(opts.param_copies, params, None)
        works = [compute_view(p) for p in p_leaves]
        gs = []
        for g, w in zip(g_leaves, works):
            prepared = prepared_grad(g, opts.grad_scale, state_dtype(w))
            gs.append(prepared.clone() if prepared is g else prepared)  # torch may change grads in place
        if torch.compiler.is_compiling():
            torch.ops.zerostep.torch_optimizer_step(
                self.handle,
                works,
                gs,
                _state_leaves(state),
                _as_tensor(lr),
                _opt_tensor(opts.beta1),
                _opt_tensor(opts.beta2),
            )
        else:
            self.step(works, gs, state, lr, opts.beta1, opts.beta2)
        for p, w, copy in zip(p_leaves, works, c_leaves):
            finish_param(p, w, copy)

    def step(
        self,
        works: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: TorchOptimizerState,
        lr: Scalar,
        beta1: Scalar | None,
        beta2: Scalar | None,
    ) -> None:
        """Eager: run the torch optimizer leaf by leaf over views of ``works`` and of ``state``."""
        if self.state_spec is None:
            raise RuntimeError(f"{self.label}: init() must run in this process before update()")
        setups = self.setups_cache[tuple(w.numel() for w in works)]
        # key -> per-leaf values (a {piece index: tensor} dict per leaf for "others")
        per_leaf_state = {
            where: {k: self.params_spec.flatten_up_to(tree) for k, tree in getattr(state, where).items()}
            for where in ("tensors", "scalars", "others")
        }
        first = int(state.initialized.item()) == 0
        lr = _as_float(lr)
        factors = self.piece_factors(works, setups)
        for i, (w, g, setup) in enumerate(zip(works, grads, setups)):
            if not w.is_contiguous():
                raise ValueError(f"{self.label}: parameters must be contiguous, got strides {w.stride()}")
            views = [self.view(setup, w.view(-1), j) for j in range(len(setup.pieces))]
            for j, v in enumerate(views):
                v.grad = self.view(setup, g.reshape(-1), j)
            opt = self.build(setup, views, lr, factors[i])
            if beta1 is not None:
                for group in opt.param_groups:
                    if "betas" in group:
                        b2 = group["betas"][1] if beta2 is None else _as_float(beta2)
                        group["betas"] = (_as_float(beta1), b2)
            if not first:
                for j, v in enumerate(views):
                    opt.state[v] = self.piece_state(per_leaf_state, i, j, setup)
            opt.step()
            for j, v in enumerate(views):
                v.grad = None
                self.store_piece(per_leaf_state, i, j, setup, opt.state.get(v, {}))
            self.store_scalars(per_leaf_state, i, [opt.state.get(v, {}) for v in views])
        state.initialized.fill_(1)

    def piece_state(self, per_leaf_state, i: int, j: int, setup: _LeafSetup) -> dict[str, Any]:
        """The torch state dict of piece ``j`` of leaf ``i``: views of the stored tensors, fresh copies
        of the scalars (torch increments each parameter's ``step`` in place)."""
        st: dict[str, Any] = {}
        piece = setup.pieces[j]
        for k in self.piece_keys[i][j]:
            kd = self.kinds[k]
            if kd.where == "tensors":
                st[k] = self.view(setup, per_leaf_state["tensors"][k][i].view(-1), j)
            elif kd.where == "scalars":
                value = per_leaf_state["scalars"][k][i]
                st[k] = kd.pytype(value.item()) if kd.pytype is not None else value.clone()
            else:
                st[k] = per_leaf_state["others"][k][i][str(piece.index)]
        return st

    def store_piece(self, per_leaf_state, i: int, j: int, setup: _LeafSetup, st: Mapping[str, Any]) -> None:
        """Copy what the torch optimizer holds for piece ``j`` after its step into the stored state
        (a no-op for tensors it updated in place)."""
        piece = setup.pieces[j]
        for k, value in st.items():
            kd = self.kinds.get(k)
            if kd is None or k not in self.piece_keys[i][j]:
                raise RuntimeError(
                    f"{self.label} created state {k!r} that its trial step at init did not; "
                    "zerostep fixes the state's structure at init"
                )
            if kd.where == "tensors":
                target = self.view(setup, per_leaf_state["tensors"][k][i].view(-1), j)
            elif kd.where == "others":
                target = per_leaf_state["others"][k][i][str(piece.index)]
            else:
                continue  # scalars: once per leaf, in store_scalars
            if value is not target:
                target.copy_(value)

    def store_scalars(self, per_leaf_state, i: int, states: list[Mapping[str, Any]]) -> None:
        for k, kd in self.kinds.items():
            if kd.where != "scalars":
                continue
            values = [_scalar_tensor(st[k]) for st in states if k in st]
            if not values:
                continue
            if any(not torch.equal(values[0], v) for v in values[1:]):
                raise RuntimeError(
                    f"{self.label} keeps scalar state {k!r} that differs between the parameters "
                    "of one flat leaf; zerostep stores one value per leaf"
                )
            target = per_leaf_state["scalars"][k][i]
            target.copy_(values[0].to(dtype=target.dtype, device=target.device))


def _factor_at(x: Any, index: int) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.reshape(-1)[index]) if x.numel() > 1 else float(x)
    return float(x)


def _state_leaves(state: TorchOptimizerState) -> list[torch.Tensor]:
    """``optree.tree_leaves(state)``, written out field by field (dynamo cannot flatten the NamedTuple
    itself); dicts flatten in sorted key order, as optree does."""
    leaves = [state.initialized]
    for field in (state.tensors, state.scalars, state.others):
        for k in sorted(field):
            leaves.extend(optree.tree_leaves(field[k]))
    return leaves


def _scalar_tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, bool):
        return torch.tensor(v)
    if isinstance(v, int):
        return torch.tensor(v, dtype=torch.int64)
    return torch.tensor(float(v), dtype=torch.float64)


def _as_tensor(x: Scalar) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x))


def _opt_tensor(x: Scalar | None) -> torch.Tensor | None:
    return None if x is None else _as_tensor(x)


@torch.library.custom_op("zerostep::torch_optimizer_step", mutates_args=("params", "state"))
def _torch_optimizer_step(
    handle: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: list[torch.Tensor],
    lr: torch.Tensor,
    beta1: torch.Tensor | None,
    beta2: torch.Tensor | None,
) -> None:
    """One torch optimizer step in place, opaque to the compiler (``handle`` names the adapter)."""
    adapter = _ADAPTERS[handle]
    adapter.step(params, grads, optree.tree_unflatten(adapter.state_spec, state), lr, beta1, beta2)


@_torch_optimizer_step.register_fake
def _(handle, params, grads, state, lr, beta1, beta2) -> None:
    return None
