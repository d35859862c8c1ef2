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

``shard_module`` returns a ``ShardSpec`` per parameter name (tied aliases included): replicated, or split
along ``dim`` into ``tp_size`` shards with the ``fused`` part sizes; ``shard_of_full`` /
``full_from_shards`` are the pure tensor functions that cut a full tensor into a rank's shard and
reassemble the full tensor from all shards, at any TP size (checkpoints saved at one size load at
another).

Collectives: small ``autograd.Function``s over c10d (gloo and NCCL) in eager mode and over functional
collectives while ``torch.compile`` traces. ``torch.distributed.nn.functional.all_reduce`` is not used:
its backward all-reduces the gradient too, which for Megatron's replicated-loss convention multiplies
the gradient by ``tp``; the functional collectives' ``all_reduce`` has no autograd formula at all.
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
    module divided by tp (an attribute the module lacks is skipped: names differ across versions).
    """

    layers: Mapping[str, str]
    transposed: frozenset[str] = frozenset()
    fused: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    fixups: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {p: s for p, s in self.layers.items() if s not in STYLES}
        if bad:
            raise TPPlanError(f"TPPlan: unknown style(s) {bad}; known: {list(STYLES)}")
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
        self.style, self.transposed, self.group, self.replaced = style, transposed, group, replaced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style != "rowwise":
            x = copy_to_tp(x, self.group)
        y = x @ self.weight if self.transposed else F.linear(x, self.weight)  # [..., out_local or out]
        if self.style == "rowwise":
            y = reduce_from_tp(y, self.group)
        if self.bias is not None:
            y = y + self.bias
        return gather_from_tp(y, self.group) if self.style == "colwise_gather" else y

    def extra_repr(self) -> str:
        return f"{self.replaced}, {self.style}, local weight {list(self.weight.shape)}"


class VocabParallelEmbedding(nn.Module):
    """An ``nn.Embedding`` holding rows ``[start, start + V/tp)``; other ids look up zeros, then the
    partial embeddings are all-reduced. ``num_embeddings`` stays the full vocabulary size."""

    def __init__(self, weight: nn.Parameter, embedding: nn.Embedding, start: int, group: dist.ProcessGroup):
        super().__init__()
        self.weight, self.start, self.group = weight, start, group
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.max_norm = embedding.padding_idx, embedding.max_norm
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise TPPlanError(
                "vocab-parallel embedding: max_norm, scale_grad_by_freq and sparse are unsupported"
            )

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
    missing = sorted(set(plan.layers) - set(modules))
    if missing:
        raise TPPlanError(f"TPPlan: no module(s) {missing[:8]} in {type(model).__name__}")
    for path, attrs in plan.fixups.items():
        if path not in modules:
            raise TPPlanError(f"TPPlan: fixup path {path!r} is not a module of {type(model).__name__}")
        for attr in attrs:
            value = getattr(modules[path], attr, None)
            if isinstance(value, int) and value % tp_size:
                raise TPPlanError(f"tp_size={tp_size} does not divide {path}.{attr}={value}")
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
    "plan_specs",
    "reduce_from_tp",
    "shard_module",
    "shard_of_full",
]
