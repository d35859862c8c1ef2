"""Megatron-style tensor parallelism as an in-place module transform over plain parameters.

A ``TPPlan`` names, per module path, how that module is split over a tensor-parallel group of ``tp``
ranks; ``shard_module`` replaces each planned module by a ``ParallelLinear`` / ``VocabParallelEmbedding``
holding THIS RANK'S SHARD of the weight and bias as plain ``nn.Parameter``s under the same names (not
DTensors: the training engine flattens plain parameters into ZeRO's flat buffers and runs the module with
``torch.func.functional_call``, and a parameter's name stays the model's). Styles:

- ``"colwise"``: ``y_r = x @ W_r.T + b_r``, output features split (``W [out, in]`` rows, ``b`` split).
  The input passes through ``copy_to_tp``: identity forward, all-reduce of the input gradient backward
  (each rank's partial ``dx`` from its output slice).
- ``"colwise_gather"``: colwise, then the outputs all-gathered along the last dim (an LM head whose
  logits the loss or ``generate`` needs whole); backward keeps this rank's slice of the gradient.
- ``"rowwise"``: input features split (the input is the previous colwise layer's split output);
  ``y = all_reduce(x_r @ W_r.T) + b``: all-reduce forward, identity backward, the bias replicated and
  added once, after the reduce.
- ``"vocab"`` (``nn.Embedding``): rows (token ids) split; ids outside this rank's range look up a zero
  row, and the partial embeddings are all-reduced (forward), identity backward.

So a transformer block costs two all-reduces forward and two backward, and every replicated parameter
(norms, position embeddings, row biases) gets the same full gradient on every rank: the engine reduces
its gradients over the data-parallel group only, and counts its squared norm once, not per TP rank.

``transposed`` paths hold ``W [in, out]`` (Hugging Face's ``Conv1D``): colwise splits dim 1 there,
rowwise dim 0. ``fused`` paths hold several tensors concatenated along the split dim (a fused qkv
``[q; k; v]``): each part is split separately and rank ``r``'s shard is ``[q_r; k_r; v_r]``, so it holds
its own heads' q, k and v. ``fixups`` divide module attributes (head counts, split sizes) by ``tp``.
``grad_reduce`` paths hold replicated parameters applied to this rank's heads only (Qwen3's per-head
q/k norms): each rank's gradient is a partial sum, so reading such a parameter goes through
``copy_to_tp`` (identity forward, all-reduce backward) and every rank gets the full gradient; their
specs say replicated.

``shard_module`` returns a ``ShardSpec`` per parameter name (tied aliases included): replicated, or split
along ``dim`` into ``tp_size`` shards with the ``fused`` part sizes; ``shard_of_full`` /
``full_from_shards`` are the pure tensor functions that cut a full tensor into a rank's shard and
reassemble the full tensor from all shards, at any TP size (checkpoints saved at one size load at
another).

Collectives: small ``autograd.Function``s over c10d (any backend; run on gloo) in eager mode and over
functional collectives while ``torch.compile`` traces (both checked on 2 gloo ranks, compiled with
``fullgraph=True`` too, ZEROSTEP_SLOW_TESTS=1). Neither ``torch.distributed.nn.functional.all_reduce``
nor the functional collectives' ``all_reduce`` fits: both differentiate as an all-reduce of the
gradient (torch 2.13, measured), which is right for a loss summed over ranks but multiplies Megatron's
gradients (one loss, replicated on every TP rank) by ``tp``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

STYLES = ("colwise", "colwise_gather", "rowwise", "vocab")


class TPPlanError(ValueError):
    """A plan that does not fit the model or the tensor-parallel size."""


@dataclasses.dataclass(frozen=True)
class TPPlan:
    """How to split a model: module path -> style (see the module docstring), plus layout facts.

    ``transposed``: paths whose weight is ``[in, out]``; ``fused``: path -> the full sizes of the parts
    concatenated along the split dim (each divisible by tp); ``fixups``: path -> attribute names of that
    module divided by tp (an attribute the module lacks is skipped: names differ across versions);
    ``grad_reduce``: paths of modules with replicated parameters whose gradients are summed over TP.
    """

    layers: Mapping[str, str]
    transposed: frozenset[str] = frozenset()
    fused: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    fixups: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    grad_reduce: frozenset[str] = frozenset()  # modules whose parameters see only the local heads

    def __post_init__(self) -> None:
        bad = {p: s for p, s in self.layers.items() if s not in STYLES}
        if bad:
            raise TPPlanError(f"TPPlan: unknown style(s) {bad}; known: {list(STYLES)}")
        overlap = sorted(set(self.grad_reduce) & set(self.layers))
        if overlap:
            raise TPPlanError(f"TPPlan: grad_reduce paths {overlap} are also sharded layers")
        for what, paths in (("transposed", self.transposed), ("fused", self.fused)):
            stray = sorted(set(paths) - set(self.layers))
            if stray:
                raise TPPlanError(f"TPPlan: {what} paths {stray} are not in layers")


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How one parameter is held: ``dim is None`` replicated; else split along ``dim`` into ``tp_size``
    equal shards, part by part when ``fused`` (the full sizes along ``dim`` of the concatenated parts)."""

    dim: int | None
    tp_size: int = 1
    fused: tuple[int, ...] = ()

    @property
    def sharded(self) -> bool:
        return self.dim is not None and self.tp_size > 1

    def at(self, tp_size: int) -> ShardSpec:
        """The same split at another TP size (to reshard a checkpoint)."""
        return dataclasses.replace(self, tp_size=tp_size)


REPLICATED = ShardSpec(None, 1)


def _parts(full_len: int, spec: ShardSpec) -> tuple[int, ...]:
    parts = spec.fused or (full_len,)
    if sum(parts) != full_len:
        raise TPPlanError(f"fused part sizes {parts} do not add up to {full_len}")
    for p in parts:
        if p % spec.tp_size:
            raise TPPlanError(f"tp_size={spec.tp_size} does not divide a part of size {p} (of {parts})")
    return parts


def shard_of_full(full: torch.Tensor, spec: ShardSpec, rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` (a view where possible; ``full`` itself when replicated)."""
    if not spec.sharded:
        return full
    if not 0 <= rank < spec.tp_size:
        raise ValueError(f"rank {rank} outside tp_size={spec.tp_size}")
    parts = _parts(full.shape[spec.dim], spec)
    pieces = [p.chunk(spec.tp_size, spec.dim)[rank] for p in full.split(parts, spec.dim)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, spec.dim)  # [q_r; k_r; v_r]


def full_from_shards(shards: Sequence[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """The full tensor from every rank's shard (in rank order); the inverse of ``shard_of_full``."""
    if not spec.sharded:
        return shards[0]
    if len(shards) != spec.tp_size:
        raise ValueError(f"full_from_shards: {len(shards)} shards for tp_size={spec.tp_size}")
    dim = spec.dim
    full_len = sum(s.shape[dim] for s in shards)
    parts = _parts(full_len, spec)
    local = [p // spec.tp_size for p in parts]
    per_rank = [s.split(local, dim) for s in shards]  # [rank][part]
    return torch.cat([torch.cat([pr[i] for pr in per_rank], dim) for i in range(len(parts))], dim)


def gather_full(local: torch.Tensor, spec: ShardSpec, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The full tensor on every rank of ``group`` from each rank's ``local`` shard (no autograd): a
    checkpoint's or a consolidated state dict's value of a sharded parameter."""
    if not spec.sharded:
        return local
    pieces = [torch.empty_like(local) for _ in range(spec.tp_size)]
    dist.all_gather(pieces, local.detach().contiguous(), group=group)
    return full_from_shards(pieces, spec)


# ---------------------------------------------------------------------------------------------------------
# Collectives with Megatron's autograd
# ---------------------------------------------------------------------------------------------------------


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(x, "sum", group)
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _all_gather_last(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    n = dist.get_world_size(group)
    x = x.contiguous()
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        stacked = funcol.all_gather_tensor(x, 0, group)  # [n * d0, ...]
        return torch.cat(stacked.chunk(n, 0), dim=-1)
    pieces = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(pieces, x, group=group)
    return torch.cat(pieces, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.width = group, x.shape[-1]
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        return grad.narrow(-1, rank * ctx.width, ctx.width).contiguous(), None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient backward: the input of a column-parallel layer."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward: the output of a row-parallel layer."""
    return _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather along the last dim forward; this rank's slice of the gradient backward."""
    return _GatherFromTP.apply(x, group)


# ---------------------------------------------------------------------------------------------------------
# Sharded modules
# ---------------------------------------------------------------------------------------------------------


class _Group:
    """A process group held by a module: ``copy.deepcopy(model)`` shares it (a ``ProcessGroup`` cannot be
    copied, and a copy of a sharded module runs over the same ranks)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __deepcopy__(self, memo: dict) -> _Group:
        return self


class ParallelLinear(nn.Module):
    """A Linear (``W [out, in]``) or Conv1D (``transposed``: ``W [in, out]``) holding this rank's shard.

    ``weight`` and ``bias`` keep the replaced module's parameter names; ``bias`` is split for the
    colwise styles and replicated (added after the all-reduce) for rowwise.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        style: str,
        transposed: bool,
        group: dist.ProcessGroup,
        replaced: str,
    ):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.style, self.transposed, self.replaced = style, transposed, replaced
        self._group = _Group(group)

    @property
    def group(self) -> dist.ProcessGroup:
        return self._group.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style != "rowwise":
            x = copy_to_tp(x, self.group)
        y = self.local_matmul(x)  # [..., out_local or out]
        if self.style == "rowwise":
            y = reduce_from_tp(y, self.group)
        if self.bias is not None:
            y = y + self.bias
        return gather_from_tp(y, self.group) if self.style == "colwise_gather" else y

    def local_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's product with its shard, before any collective (a subclass may hold the shard
        otherwise, e.g. int8)."""
        return x @ self.weight if self.transposed else F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.replaced}, {self.style}, local weight {list(self.weight.shape)}"


class VocabParallelEmbedding(nn.Module):
    """An ``nn.Embedding`` holding rows ``[start, start + V/tp)``; other ids look up zeros, then the
    partial embeddings are all-reduced. ``num_embeddings`` stays the full vocabulary size."""

    def __init__(self, weight: nn.Parameter, embedding: nn.Embedding, start: int, group: dist.ProcessGroup):
        super().__init__()
        self.weight, self.start, self._group = weight, start, _Group(group)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.max_norm = embedding.padding_idx, embedding.max_norm
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise TPPlanError(
                "vocab-parallel embedding: max_norm, scale_grad_by_freq and sparse are unsupported"
            )

    @property
    def group(self) -> dist.ProcessGroup:
        return self._group.group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.shape[0]
        local = ids - self.start
        outside = (local < 0) | (local >= rows)  # ids held by other ranks
        pad = self.padding_idx
        pad = pad - self.start if pad is not None and 0 <= pad - self.start < rows else None
        out = F.embedding(local.masked_fill(outside, 0), self.weight, padding_idx=pad)  # [..., C]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return f"vocab {self.num_embeddings}, rows [{self.start}, {self.start + self.weight.shape[0]})"


class _GradReduced:
    """Mixed into a module's class by ``shard_module`` for ``grad_reduce`` paths: inside its forward, its
    own parameters read through ``copy_to_tp``. Parameter access goes through ``nn.Module.__getattr__``
    (parameters live in ``_parameters``), also for the tensors ``functional_call`` swaps in, so names
    stay the model's; outside the forward ``module.weight`` (and its ``.grad``) is the parameter.
    The forward runs outside ``torch.compile`` (a graph break): traced, dynamo reads the parameters
    without ``__getattr__`` and the gradient would silently stay partial (measured)."""

    def _forward(self, *args, **kwargs):
        self.__dict__["_tp_in_forward"] = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.__dict__["_tp_in_forward"] = False

    def __getattr__(self, name: str):
        value = super().__getattr__(name)
        if self.__dict__.get("_tp_in_forward") and name in self.__dict__["_tp_reduced_names"]:
            return copy_to_tp(value, self.__dict__["_tp_reduced_group"].group)
        return value


_REDUCED_CLASSES: dict[type, type] = {}


def _reduce_grads_of(module: nn.Module, group: dist.ProcessGroup) -> None:
    cls = type(module)
    if cls not in _REDUCED_CLASSES:
        forward = torch.compiler.disable(_GradReduced._forward)  # here: importing dynamo costs 1.8 s
        attrs = {"__module__": cls.__module__, "forward": forward}
        _REDUCED_CLASSES[cls] = type(cls.__name__, (_GradReduced, cls), attrs)
    module.__class__ = _REDUCED_CLASSES[cls]
    module._tp_reduced_names = frozenset(n for n, _ in module.named_parameters(recurse=False))
    module._tp_reduced_group = _Group(group)


def _split_dim(style: str, transposed: bool, param: str) -> int | None:
    """The dim of ``param`` ("weight"/"bias") that ``style`` splits, None when replicated."""
    if style == "vocab":
        return 0 if param == "weight" else None
    if style == "rowwise":
        return (0 if transposed else 1) if param == "weight" else None
    return (1 if transposed else 0) if param == "weight" else 0  # colwise: output features


def _spec(plan: TPPlan, path: str, param: str, tensor: torch.Tensor, tp: int) -> ShardSpec:
    style, transposed = plan.layers[path], path in plan.transposed
    dim = _split_dim(style, transposed, param)
    if dim is None:
        return ShardSpec(None, 1)
    fused = tuple(plan.fused.get(path, ()))
    spec = ShardSpec(dim, tp, fused)
    try:
        _parts(tensor.shape[dim], spec)
    except TPPlanError as e:
        raise TPPlanError(f"{path}.{param} {list(tensor.shape)}, dim {dim}: {e}") from None
    return spec


def _check_module(path: str, module: nn.Module, style: str) -> None:
    if style == "vocab":
        if not isinstance(module, nn.Embedding):
            raise TPPlanError(f"{path}: style 'vocab' needs an nn.Embedding, got {type(module).__name__}")
    elif not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() != 2:
        raise TPPlanError(
            f"{path}: style {style!r} needs a module with a 2-D weight, got {type(module).__name__}"
        )


def plan_specs(model: nn.Module, plan: TPPlan, tp_size: int) -> dict[str, ShardSpec]:
    """Check ``plan`` against ``model`` at ``tp_size`` (no process group needed) and return the
    ``ShardSpec`` of every parameter name, tied aliases included. Raises ``TPPlanError``."""
    modules = dict(model.named_modules(remove_duplicate=False))
    missing = sorted((set(plan.layers) | set(plan.grad_reduce)) - set(modules))
    if missing:
        raise TPPlanError(f"TPPlan: no module(s) {missing[:8]} in {type(model).__name__}")
    for path, attrs in plan.fixups.items():
        if path not in modules:
            raise TPPlanError(f"TPPlan: fixup path {path!r} is not a module of {type(model).__name__}")
        for attr in attrs:
            value = getattr(modules[path], attr, None)
            if isinstance(value, int) and value % tp_size:
                raise TPPlanError(
                    f"tp_size={tp_size} does not divide {path + '.' if path else ''}{attr}={value}"
                )
    specs: dict[str, ShardSpec] = {}
    for path, style in plan.layers.items():
        _check_module(path, modules[path], style)
        for param in ("weight", "bias"):
            t = getattr(modules[path], param, None)
            if isinstance(t, torch.Tensor):
                specs[f"{path}.{param}" if path else param] = _spec(plan, path, param, t, tp_size)
    # every name of a parameter: a tie must be split the same way under each of its names
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for names in by_id.values():
        given = {n: specs.get(n, REPLICATED) for n in names}
        kinds = {(s.dim, s.fused) if s.sharded else None for s in given.values()}
        if len(kinds) > 1:
            raise TPPlanError(
                f"tied parameter split inconsistently: {', '.join(f'{n}: {s}' for n, s in given.items())}; "
                "plan every name of a tied weight the same way (e.g. embedding 'vocab' with head "
                "'colwise_gather') or none"
            )
        specs.update(given)
    return specs


def _divide_fixups(module: nn.Module, attrs: Sequence[str], tp: int) -> None:
    for attr in attrs:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(module, attr, value // tp)


def shard_module(model: nn.Module, plan: TPPlan, tp_group: dist.ProcessGroup | None) -> dict[str, ShardSpec]:
    """Shard ``model`` in place over ``tp_group`` (every rank holds the same full weights on entry);
    returns ``name -> ShardSpec`` for every parameter name (tied aliases included).

    ``tp_group`` None or of size 1: the model is left as it is and every parameter is replicated.
    The plan is checked completely before anything changes, so an error leaves the model intact.
    """
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    if tp == 1:
        return {n: REPLICATED for n, _ in model.named_parameters(remove_duplicate=False)}
    specs = plan_specs(model, plan, tp)
    rank = dist.get_rank(tp_group)
    modules = dict(model.named_modules(remove_duplicate=False))
    new_params: dict[int, nn.Parameter] = {}  # id(full param) -> its shard, so ties stay tied

    def local(path: str, param: str) -> nn.Parameter | None:
        full = getattr(modules[path], param, None)
        if full is None:
            return None
        if id(full) not in new_params:
            spec = specs[f"{path}.{param}" if path else param]
            shard = shard_of_full(full.detach(), spec, rank)
            shard = shard.clone() if spec.sharded else shard  # own storage: the full tensor is freed
            new_params[id(full)] = nn.Parameter(shard, requires_grad=full.requires_grad)
        return new_params[id(full)]

    replaced: dict[str, nn.Module] = {}
    for path, style in plan.layers.items():
        old = modules[path]
        if style == "vocab":
            start = rank * (old.weight.shape[0] // tp)
            replaced[path] = VocabParallelEmbedding(local(path, "weight"), old, start, tp_group)
        else:
            replaced[path] = ParallelLinear(
                local(path, "weight"),
                local(path, "bias"),
                style,
                path in plan.transposed,
                tp_group,
                type(old).__name__,
            )
    for path, new in replaced.items():
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    for path, attrs in plan.fixups.items():
        _divide_fixups(model.get_submodule(path) if path else model, attrs, tp)
    for path in plan.grad_reduce:
        _reduce_grads_of(model.get_submodule(path) if path else model, tp_group)
    return specs


__all__ = [
    "REPLICATED",
    "STYLES",
    "ParallelLinear",
    "ShardSpec",
    "TPPlan",
    "TPPlanError",
    "VocabParallelEmbedding",
    "copy_to_tp",
    "full_from_shards",
    "gather_from_tp",
    "gather_full",
    "plan_specs",
    "reduce_from_tp",
    "shard_module",
    "shard_of_full",
]
