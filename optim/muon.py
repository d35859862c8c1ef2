"""Muon with an auxiliary AdamW, as DeepSpeed 0.19's ``MuonWithAuxAdam`` (``"type": "Muon"``).

Which parameter gets which (DeepSpeed's ``set_optimizer_flags``): Muon for every parameter with 2 or
more dimensions whose name contains neither ``embed`` nor ``lm_head`` (case-insensitive); AdamW for the
rest (embeddings, heads, biases, norms). Per Muon parameter ``p`` with gradient ``g``:

    m <- lerp(m, g, 1 - momentum)                        (momentum buffer)
    u <- lerp(g, m, momentum) if nesterov else m         (DeepSpeed always uses nesterov)
    O <- NewtonSchulz(u) * scale                          (4-D parameters as [shape[0], -1]; 3-D batched)
    p <- p * (1 - lr * weight_decay) - lr * O

``scale`` is Keller Jordan's ``sqrt(max(1, rows / cols))`` (DeepSpeed's and ``torch.optim.Muon``'s
default, ``adjust_lr_fn="original"``) or Moonlight's ``0.2 * sqrt(max(rows, cols))``
(``"match_rms_adamw"``, matching AdamW's update RMS; DeepSpeed does not offer it). Per AdamW parameter,
DeepSpeed's ``adam_update``: Adam moments with bias correction, ``eps`` outside the root, decoupled
weight decay ``p *= 1 - adam_lr * weight_decay``.

Learning rates. DeepSpeed gives the Muon group ``muon_lr`` (else ``lr``, else 0.02) and the Adam group
``adam_lr`` (else ``lr``, else 3e-4). ``Optimizer.lr`` is the Muon group's; the lr passed to ``update``
drives the Muon group and the Adam group follows at the ratio ``adam_lr / muon_lr``, unless
``schedule_sets_lr``: then both take the passed lr, as DeepSpeed's LR schedulers set every param group
to the schedule's value. OneCycle does not cycle momentum (the DeepSpeed class has no ``betas`` default).

State: ``exp_avg`` holds the momentum buffer on Muon parameters and Adam's first moment elsewhere;
``exp_avg_sq`` Adam's second moment (zero on Muon parameters). Both are shaped like the params, so flat
ZeRO shards checkpoint and reshard like every other optimizer's.

Under ZeRO (``param_pieces`` with sharded leaves) a matrix may be cut across ranks. Each rank updates
its momentum shard and computes its slice of the Muon direction ``u``; whole matrices then come from
one of two strategies (``distributed``, ``zerostep.optim.muon_shards``): ``"owner"`` (the default)
gives each matrix to the rank holding most of it, sends the owner the other holders' slices of ``u``
and returns the orthogonalized slices (two all-to-alls per unit, only for units with a cut matrix);
``"allgather"`` all-gathers the unit's ``u`` (shard [S] -> full [N * S]) and orthogonalizes every
matrix touching the shard on each rank. Matrices of one shape are orthogonalized as one batch.

Under tensor parallelism (``split_matrices``: parameter name -> ``optim.model_parallel.MatrixSplit``) a
matrix split over the model-parallel group is gathered whole (its shards from every model-parallel
rank), orthogonalized at its full shape and scaled by it, and this rank keeps its shard: the update is
the one-process update of the whole matrix. Replicated matrices need nothing (every rank holds them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from zerostep.errors import ConfigError
from zerostep.optim.base import (
    Optimizer,
    PerLeaf,
    PyTree,
    Scalar,
    StepOptions,
    check_betas,
    check_range,
    compute_view,
    finish_param,
    leaves_like,
    loop_invariant,
    per_leaf,
    prepared_grad,
    step_count,
    zeros_like_state,
)
from zerostep.optim.model_parallel import MatrixSplit
from zerostep.optim.muon_shards import (
    Exchange,
    Matrix,
    OwnerPlan,
    check_strategy,
    owner_orthogonalized,
    owner_plan,
)
from zerostep.optim.newton_schulz import NS_METHODS, auto_dtype, newton_schulz
from zerostep.optim.pieces import FlatPieces, ParamPiece, resolve_pieces, runs_tensor

ADJUST_LR_FNS = ("original", "match_rms_adamw")
NS_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NOT_MUON = ("embed", "lm_head")


class MuonState(NamedTuple):
    count: torch.Tensor  # 0-d fp32: steps taken
    exp_avg: PyTree  # Muon's momentum buffer on Muon parameters, Adam's first moment on the others
    exp_avg_sq: PyTree  # Adam's second moment (stays zero on Muon parameters)


def uses_muon(name: str, shape: tuple[int, ...]) -> bool:
    """DeepSpeed's split: Muon for 2+-dimensional parameters not named like an embedding or head."""
    return len(shape) >= 2 and not any(key in name.lower() for key in _NOT_MUON)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape Newton-Schulz sees: conv filters [out, in, kh, kw] as [out, in*kh*kw], else unchanged
    (3-D and higher are batches of matrices), as DeepSpeed's ``muon_update``."""
    return (shape[0], math.prod(shape[1:])) if len(shape) == 4 else shape


def update_scale(shape: tuple[int, ...], adjust_lr_fn: str) -> float:
    """The factor on the orthogonalized update, from the parameter's last two dimensions."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


class _LeafPlan(NamedTuple):
    """What one leaf needs, fixed for the optimizer's lifetime."""

    kind: str  # "adam": no Muon element; "muon": every element; "mixed"
    muon_runs: tuple[tuple[int, int], ...]  # local element ranges that are Muon's
    batches: tuple[tuple[Matrix, ...], ...]  # Muon matrices touching the leaf, grouped by NS shape
    # the leaf's Muon update assembled in order: ("zeros", length) or ("piece", batch, member, lo, hi)
    segments: tuple[tuple, ...]
    sharded: bool
    owner: OwnerPlan | None = None  # the owner strategy's plan (else the all-gather's above)
    # the update issues a collective on this leaf: every rank of the unit must, even one whose shard
    # holds no Muon element (it then joins with zeros and discards the result)
    collective: bool = False


def _matrix(
    name: str, shape: tuple[int, ...], offset: int, adjust_lr_fn: str, splits: Mapping[str, MatrixSplit]
) -> Matrix:
    """A Muon matrix; one split over the model-parallel group is scaled by its full shape."""
    split = splits.get(name)
    if split is not None and len(shape) != 2:
        raise ValueError(f"Muon over a model-parallel split: {name} {list(shape)} is not a 2-D matrix")
    scale_shape = split.full_shape if split is not None else shape
    scale = update_scale(scale_shape, adjust_lr_fn)
    return Matrix(offset, math.prod(shape), matrix_shape(shape), scale, name)


def unit_matrices(
    pieces: FlatPieces, adjust_lr_fn: str, splits: Mapping[str, MatrixSplit] | None = None
) -> list[Matrix]:
    """Every Muon matrix of the leaf's whole unit (all ranks' shards), by offset in the full buffer
    (in the leaf, for a leaf that is not a shard)."""
    if not pieces.sharded:  # the leaf holds whole parameters
        named = [(p.name, p.shape, p.start - p.param_start) for p in pieces.pieces]
    elif len(pieces.param_offsets) == len(pieces.params):
        named = [(n, s, o) for (n, s), o in zip(pieces.params, pieces.param_offsets)]
    else:
        raise ValueError("Muon's owner strategy over a sharded leaf needs FlatPieces.param_offsets")
    return sorted(
        (
            _matrix(name, shape, offset, adjust_lr_fn, splits or {})
            for name, shape, offset in named
            if uses_muon(name, shape)
        ),
        key=lambda m: m.offset,
    )


def _leaf_plan(
    pieces: FlatPieces, n: int, adjust_lr_fn: str, distributed: str, splits: Mapping[str, MatrixSplit]
) -> _LeafPlan:
    muon = [p for p in pieces.pieces if uses_muon(p.name, p.shape)]
    runs = tuple((p.start, p.stop) for p in muon)
    kind = "adam" if not muon else "muon" if sum(p.numel for p in muon) == n else "mixed"
    if distributed == "owner":
        world_size = pieces.full_numel // n if pieces.sharded else 1
        rank = pieces.offset // n if pieces.sharded else 0
        if pieces.sharded and (pieces.full_numel != world_size * n or pieces.offset != rank * n):
            raise ValueError(
                f"a sharded leaf of {n} elements must be one of the equal shards of its "
                f"{pieces.full_numel}-element buffer, at a multiple of {n} (got offset {pieces.offset})"
            )
        if not muon and not pieces.sharded:
            return _LeafPlan("adam", (), (), (), False)
        plan = owner_plan(unit_matrices(pieces, adjust_lr_fn, splits), rank, n, world_size)
        return _LeafPlan(kind, runs, (), (), pieces.sharded, plan, plan.exchanges)
    # all-gather: every rank of a unit holding any Muon matrix joins its all-gather
    collective = pieces.sharded and any(uses_muon(name, shape) for name, shape in pieces.params or ())
    collective = collective or (pieces.sharded and bool(muon))
    if not muon:
        return _LeafPlan("adam", (), (), (("zeros", n),), pieces.sharded, None, collective)
    by_shape: dict[tuple[int, ...], list[ParamPiece]] = {}
    for p in muon:
        by_shape.setdefault(matrix_shape(p.shape), []).append(p)
    where: dict[int, tuple[int, int]] = {}  # piece.start -> (batch, member)
    batches = []
    for b, members in enumerate(by_shape.values()):
        batch = []
        for m, p in enumerate(members):
            batch.append(_matrix(p.name, p.shape, pieces.param_offset(p), adjust_lr_fn, splits))
            where[p.start] = (b, m)
        batches.append(tuple(batch))
    segments, at = [], 0
    for p in muon:
        if p.start > at:
            segments.append(("zeros", p.start - at))
        b, m = where[p.start]
        segments.append(("piece", b, m, p.param_start, p.param_start + p.numel))
        at = p.stop
    if at < n:
        segments.append(("zeros", n - at))
    return _LeafPlan(kind, runs, tuple(batches), tuple(segments), pieces.sharded, None, collective)


def muon(
    lr: float = 0.02,
    momentum: float = 0.95,
    weight_decay: float = 0.0,
    *,
    ns_method: str = "gram",
    adam_lr: float = 3e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-10,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_dtype: str = "auto",
    adjust_lr_fn: str = "original",
    schedule_sets_lr: bool = False,
    param_pieces: PerLeaf = None,
    lr_multipliers: PerLeaf = None,
    weight_decay_mask: PerLeaf = None,
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    distributed: str = "owner",
    exchange: Exchange | None = None,
    split_matrices: Mapping[str, MatrixSplit] | None = None,
) -> Optimizer:
    """DeepSpeed's MuonWithAuxAdam over a pytree (or the engine's flat shards, with ``param_pieces``).

    ``lr`` is the Muon group's learning rate, ``adam_lr`` the Adam group's (see the module docstring for
    how a scheduled lr reaches both). ``ns_dtype``: Newton-Schulz working precision, ``"auto"`` for
    DeepSpeed's choice (bf16/fp16 on GPUs), or ``"float32"``, ``"bfloat16"``, ``"float16"``.
    ``param_pieces``: per leaf, a ``FlatPieces`` saying which parameters the leaf holds (leaves without
    one are whole parameters named by their pytree path). ``distributed``: how sharded leaves get whole
    matrices, ``"owner"`` (needs ``exchange``: an all-to-all ``(send, send_splits, recv_splits) ->
    received``) or ``"allgather"`` (needs ``all_gather``: shard -> full buffer over the ranks); see
    ``zerostep.optim.muon_shards``. ``lr_multipliers`` / ``weight_decay_mask``: per-leaf factors
    (numbers, or tensors shaped like the leaf) on both groups' lr and weight decay (the engine's param
    groups). ``split_matrices``: parameter name -> ``MatrixSplit`` for matrices split over a
    model-parallel group (see the module docstring)."""
    b1, b2 = check_betas(betas)
    splits = dict(split_matrices or {})
    for key, value in (
        ("lr", lr),
        ("adam_lr", adam_lr),
        ("momentum", momentum),
        ("eps", eps),
        ("weight_decay", weight_decay),
    ):
        check_range(key, value, 0.0)
    check_range("momentum", momentum, 0.0, 1.0)
    if ns_method not in NS_METHODS:
        raise ConfigError(
            f"optimizer.params.ns_method: {ns_method!r} is invalid; it must be one of {list(NS_METHODS)}"
        )
    if adjust_lr_fn not in ADJUST_LR_FNS:
        raise ConfigError(
            f"optimizer.params.adjust_lr_fn: {adjust_lr_fn!r} is invalid; it must be one of "
            f"{list(ADJUST_LR_FNS)}"
        )
    check_strategy(distributed)
    if ns_dtype not in NS_DTYPES:
        raise ConfigError(
            f"optimizer.params.ns_dtype: {ns_dtype!r} is invalid; it must be one of {list(NS_DTYPES)}"
        )
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps < 100:
        raise ConfigError(
            f"optimizer.params.ns_steps: {ns_steps!r} is invalid; it must be an integer in [1, 100)"
        )
    hyper = dict(
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        ns_method=ns_method,
        adam_lr=adam_lr,
        betas=(b1, b2),
        eps=eps,
        nesterov=nesterov,
        ns_steps=ns_steps,
        ns_dtype=ns_dtype,
        adjust_lr_fn=adjust_lr_fn,
        distributed=distributed,
    )
    adam_ratio = adam_lr / lr if lr > 0 else None
    plans: dict[tuple[int, ...], list[_LeafPlan]] = {}  # by the leaves' sizes: built once
    masks: dict[tuple[int, str], torch.Tensor] = {}  # (leaf, device) -> bool [n]: Muon elements

    def leaf_plans(params: PyTree) -> list[_LeafPlan]:
        leaves = leaves_like(params)[0]
        key = tuple(leaf.numel() for leaf in leaves)
        if key not in plans:
            resolved = resolve_pieces(param_pieces, params)
            plans[key] = [
                _leaf_plan(fp, leaf.numel(), adjust_lr_fn, distributed, splits)
                for leaf, fp in zip(leaves, resolved)
            ]
            check_has_matrices(resolved)
        return plans[key]

    def muon_mask(i: int, plan: _LeafPlan, n: int, device: torch.device) -> torch.Tensor:
        key = (i, str(device))
        if key not in masks:
            masks[key] = runs_tensor(
                n, [(s, e, 1.0) for s, e in plan.muon_runs], 0.0, torch.float32, device
            ).bool()
        return masks[key]

    def init(params: PyTree) -> MuonState:
        leaves = leaves_like(params)[0]
        for i, (leaf, plan) in enumerate(zip(leaves, leaf_plans(params))):
            if plan.kind == "mixed":
                muon_mask(i, plan, leaf.numel(), leaf.device)  # built here, outside any compiled graph
        return MuonState(step_count(params), zeros_like_state(params), zeros_like_state(params))

    def apply(grads: PyTree, state: MuonState, params: PyTree, lr: Scalar, opts: StepOptions) -> None:
        count = state.count
        count.add_(1)
        t = count.double()  # fp64: 1 - beta2**t cancels in fp32
        bc1, bc2 = loop_invariant(1 - b1**t, 1 - b2**t)
        muon_lr = lr
        adam_lr_now = lr if schedule_sets_lr else (lr * adam_ratio if adam_ratio is not None else adam_lr)
        p_leaves, (g_leaves, m_leaves, v_leaves) = leaves_like(params, grads, state.exp_avg, state.exp_avg_sq)
        c_leaves = per_leaf(opts.param_copies, params, None)
        lr_factors = per_leaf(lr_multipliers, params, 1.0)
        wd_factors = per_leaf(weight_decay_mask, params, 1.0)
        leaves = zip(
            p_leaves, g_leaves, m_leaves, v_leaves, c_leaves, leaf_plans(params), lr_factors, wd_factors
        )
        for i, (p, g, m, v, copy, plan, lr_f, wd_f) in enumerate(leaves):
            lr_f, wd = _flat_factor(lr_f), weight_decay * _flat_factor(wd_f)
            pw = compute_view(p)
            flat_p, flat_m, flat_v = _flat(pw), _flat(m), _flat(v)
            flat_g = _flat(prepared_grad(g, opts.grad_scale, m.dtype))
            if plan.kind == "adam":
                step = _adam_direction(flat_g, flat_m, flat_v, b1, b2, bc1, bc2, eps)
                step_lr = adam_lr_now * lr_f
                flat_p.mul_(1 - step_lr * wd).sub_(step * step_lr)
                if plan.collective:  # other ranks' shards of the unit hold Muon matrices
                    _orthogonalized(flat_g.new_zeros(flat_g.numel()), plan, ns_steps, ns_method, ns_dtype)
            elif plan.kind == "muon":
                flat_m.lerp_(flat_g, 1 - momentum)
                direction = flat_g.lerp(flat_m, momentum) if nesterov else flat_m
                ortho = _orthogonalized(direction, plan, ns_steps, ns_method, ns_dtype)
                step_lr = muon_lr * lr_f
                flat_p.mul_(1 - step_lr * wd).sub_(ortho * step_lr)
            else:
                mask = muon_mask(i, plan, flat_p.numel(), flat_p.device)
                flat_m.lerp_(flat_g, torch.where(mask, 1 - momentum, 1 - b1))
                flat_v.lerp_(flat_g * flat_g, torch.where(mask, 0.0, 1 - b2))  # Muon elements keep v = 0
                direction = flat_g.lerp(flat_m, momentum) if nesterov else flat_m
                ortho = _orthogonalized(direction, plan, ns_steps, ns_method, ns_dtype)
                adam_step = (flat_m / bc1) / ((flat_v / bc2).sqrt() + eps)
                step_lr = torch.where(mask, muon_lr, adam_lr_now) * lr_f
                flat_p.mul_(1 - step_lr * wd).sub_(torch.where(mask, ortho, adam_step) * step_lr)
            finish_param(p, pw, copy)

    def _orthogonalized(direction, plan: _LeafPlan, steps: int, method: str, dtype_name: str) -> torch.Tensor:
        dtype = NS_DTYPES[dtype_name] or auto_dtype(method, direction.device)

        def ns(batch: torch.Tensor) -> torch.Tensor:
            return newton_schulz(batch, steps, method, dtype).to(direction.dtype)

        def orthogonalize(stacked: torch.Tensor, members: tuple[Matrix, ...]) -> torch.Tensor:
            """[B, *ns_shape] -> the same, Newton-Schulz per matrix; a model-parallel split one at its
            full shape (gathered, then this rank's shard kept), in batch order on every rank."""
            if not any(mx.name in splits for mx in members):
                return ns(stacked)
            out = []
            for local, mx in zip(stacked.unbind(0), members):
                split = splits.get(mx.name)
                if split is None:
                    out.append(ns(local[None])[0])
                    continue
                full = split.gather(local)  # [*full_shape], collective over the model-parallel group
                out.append(split.shard(ns(full[None])[0]).reshape(local.shape))
            return torch.stack(out)

        if plan.owner is not None:
            return owner_orthogonalized(direction, plan.owner, orthogonalize, exchange)
        if plan.sharded:
            if all_gather is None:
                raise ValueError("Muon over sharded flat leaves needs all_gather (shard -> full buffer)")
            full = all_gather(direction)
        else:
            full = direction
        results = []
        for batch in plan.batches:
            stacked = torch.stack([full[mx.offset : mx.offset + mx.numel].view(mx.ns_shape) for mx in batch])
            ortho = orthogonalize(stacked, batch)
            results.append([o.reshape(-1) * mx.scale for o, mx in zip(ortho.unbind(0), batch)])
        parts = []
        for seg in plan.segments:
            if seg[0] == "zeros":
                parts.append(direction.new_zeros(seg[1]))
            else:
                _, b, m, lo, hi = seg
                parts.append(results[b][m][lo:hi])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    return Optimizer(
        name="muon", lr=float(lr), hyperparams=hyper, init_fn=init, apply_fn=apply, cycles_momentum=False
    )


def check_has_matrices(resolved: list[FlatPieces]) -> None:
    """ConfigError when no parameter at all would get Muon (DeepSpeed would run AdamW only, silently)."""
    shapes = {}
    for fp in resolved:
        for name, shape in fp.params or [(p.name, p.shape) for p in fp.pieces]:
            shapes[name] = shape
    if not any(uses_muon(n, s) for n, s in shapes.items()):
        listed = ", ".join(f"{n} {list(s)}" for n, s in list(shapes.items())[:8])
        raise ConfigError(
            "optimizer.type: 'muon' needs at least one parameter with 2 or more dimensions whose name "
            f"contains neither 'embed' nor 'lm_head'; this model has none ({listed}"
            f"{', ...' if len(shapes) > 8 else ''}). Use AdamW instead"
        )


def _flat(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"Muon updates contiguous tensors in place; got strides {t.stride()}")
    return t.view(-1)


def _flat_factor(x: Any) -> Any:
    """A per-leaf factor as the flat update sees it: numbers as they are, tensors flattened."""
    if isinstance(x, bool):
        return float(x)
    return x.reshape(-1) if isinstance(x, torch.Tensor) and x.dim() > 0 else x


def _adam_direction(g, m, v, b1, b2, bc1, bc2, eps) -> torch.Tensor:
    """DeepSpeed's ``adam_update``: moments in place, the bias-corrected step returned."""
    m.lerp_(g, 1 - b1)
    v.lerp_(g * g, 1 - b2)
    return (m / bc1) / ((v / bc2).sqrt() + eps)
