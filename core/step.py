"""The training step: ``compose(forward, scaled_backward, reduce_scatter, sharded_update)``.

Read this file first. One ``engine.step`` is one optimizer step over ``GAS`` micro-batches:

1. ``forward(flats, micro_batch) -> loss``: the user's module run by ``torch.func.functional_call`` on
   parameters that are views of the per-group flat buffers (``FlatLayout.split``, whose backward is one
   ``cat``: the gradient of a group arrives as one flat buffer, ready for one collective).
2. ``scaled_backward(forward, flats, micro_batch, scale, hooks) -> (loss, grads)``: gradients of
   ``loss * scale / GAS`` w.r.t. the flat buffers (in one process, where nothing communicates, w.r.t.
   each parameter's view instead, which saves that ``cat``). Compiled with ``torch.compile``
   (AOTAutograd compiles the forward and the backward) unless communication overlaps backward
   (``overlap_comm``; unset, it is on at stage 0 over gloo's transport, see ``Engine``), whose
   per-group gradient hooks only fire one by one in an eager backward. Stage 2 runs eagerly too: its
   backward reduce-scatters each unit's gradient as soon as the unit is complete and frees the full one
   (``parallel.grad_sharding``), so no rank holds the whole model's gradient. Stage 3
   runs eagerly through ``parallel.zero3``, which gathers each unit's parameters just before use and
   reduce-scatters its gradient straight after.
3. ``reduce_scatter``, a ``Reducer`` (``reducers.py``): the one stateful phase (it accumulates
   micro-batches, in ``data_types.grad_accum_dtype``). Stage 0 all-reduces at the accumulation
   boundary, stage 1 reduce-scatters at the boundary, stages 2-3 already did it in backward (their
   accumulators are shards); identity at world size 1. With ``overlap_comm`` the stage 0-1 collectives
   start from gradient hooks.
4. ``sharded_update``: the global finite check and gradient norm with one all-reduce (graph A), then,
   unless the gradients are non-finite, unscale + clip + optimizer update of this rank's fp32 shard +
   write back of compute-dtype parameters (all-gather at stages 1-2) in one in-place graph (graph B).

Between graph A and graph B the host reads one flag (finite or not): a skipped step must leave
parameters, master and optimizer state untouched, and deciding that on the host costs one sync instead
of a ``torch.where`` pass over every buffer. Collectives stay out of the autograd graph because one
graph holding both failed in AOTAutograd (DESIGN.md); they live in their own compiled graphs.

In one process, where nothing communicates, the same four phases run as one compiled region
(``core/one_region.py``): backward is ``torch.func.grad`` traced into the graph and the skip is a
``torch.where`` fused into the update, so a step costs one compiled call and no host read.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import nn

from zerostep.core.compiling import compile_private
from zerostep.core.monitoring.timers import (
    BACKWARD_REDUCE_GLOBAL_TIMER,
    FORWARD_BACKWARD_TIMER,
    STEP_GLOBAL_TIMER,
    WallClockTimers,
)
from zerostep.core.precision import compute_dtype_of, master_dtype_of
from zerostep.core.reducers import Reducer, grad_accum_dtype_of
from zerostep.core.step_failure import (
    RanksOutOfStepError,
    RemoteStepError,
    StepVote,
    describe_remote_failure,
)
from zerostep.optim import ONE_CYCLE_BETA2
from zerostep.parallel import collectives
from zerostep.parallel.flat import FlatLayout
from zerostep.parallel.grad_sharding import ShardedBackward

Flats = dict[str, torch.Tensor]  # group name -> 1-D buffer
_UNTIMED = contextlib.nullcontext()
# A group's gradient: its flat buffer, or (one process, stages 0-2) the list of its parameters'
# gradients in layout order, which saves the concatenation that a flat gradient costs in backward.
Grads = dict[str, "torch.Tensor | list[torch.Tensor]"]


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Static facts of a step: everything here is fixed for an engine's lifetime."""

    layouts: dict[str, FlatLayout]  # group -> layout in compute dtype, padded for world_size
    stage: int
    world_size: int
    rank: int
    accumulation_steps: int
    micro_batch_size: int
    compute_dtype: torch.dtype
    gradient_clipping: float
    predivide_factor: float
    reduce_bucket_numel: int | None
    allgather_bucket_numel: int | None
    overlap_comm: bool = False  # stages 0-2: collectives start from gradient hooks during backward
    overlap_param_gather: bool = False  # zero_optimization.overlap_param_gather (see defer_param_gather)
    grad_accum_dtype: torch.dtype | None = None  # data_types.grad_accum_dtype; None: the compute dtype
    master_dtype: torch.dtype = torch.float32  # *_master_weights_and_grads: the compute dtype
    offload_optimizer: bool = False  # master and optimizer state in host memory (core/offload.py)
    # model parallelism: the norm's share and its sum over the MP group (core/model_parallel.ReplicaNorm)
    model_parallel: Any = None
    # Ulysses (parallel/ulysses.py): gradients are summed over each sequence-parallel group and averaged
    # over the world_size / sequence_parallel_size data-parallel replicas, as DeepSpeed divides them
    sequence_parallel_size: int = 1
    # units reduced and sharded over a group of their own instead of the data-parallel group: MoE experts
    # over their expert-data-parallel group (core/expert_units.py); unit -> UnitGroup(group, size, rank)
    unit_groups: Any = dataclasses.field(default_factory=dict)

    def unit_rank(self, g: str) -> int:
        """This rank's index in the group unit ``g`` is sharded over (its layout's world size)."""
        own = self.unit_groups.get(g)
        return self.rank if own is None else own.rank

    def unit_size(self, g: str) -> int:
        own = self.unit_groups.get(g)
        return self.world_size if own is None else own.size

    def group_of(self, g: str, default: Any) -> Any:
        """The process group unit ``g`` is reduced over: its own, else ``default`` (the engine's)."""
        own = self.unit_groups.get(g)
        return default if own is None else own.group

    @property
    def accumulation_dtype(self) -> torch.dtype:
        """The dtype micro-batch gradients are summed in (reducers.py)."""
        return self.grad_accum_dtype or self.compute_dtype

    @property
    def shards_grads_in_backward(self) -> bool:
        """Stage 2 on several ranks: each unit's gradient is reduce-scattered inside backward as soon as
        it is complete (``parallel.grad_sharding``), so no rank ever holds the whole model's gradient."""
        return self.stage == 2 and self.world_size > 1

    @property
    def sharded_master(self) -> bool:
        """Master (and optimizer state) hold this rank's shard, not the whole buffer. At world size 1
        the one shard is the whole buffer, so every stage is treated alike there."""
        return self.stage >= 1 and self.world_size > 1

    @property
    def params_match_master(self) -> bool:
        """Compute-dtype params have the master's shape: the whole buffer (stage 0, or world size 1)
        or, at stage 3, this rank's shard."""
        return self.stage == 3 or not self.sharded_master

    @property
    def params_alias_master(self) -> bool:
        # parameters of the master's shape and dtype are the master itself: nothing to copy back
        # (fp32 training, or a low-precision master at stage 3 or on one rank); never when the master
        # is offloaded to host memory
        same = self.compute_dtype == self.master_dtype and self.params_match_master
        return same and not self.offload_optimizer

    @property
    def defer_param_gather(self) -> bool:
        """Stages 1-2 with ``overlap_comm`` and ``overlap_param_gather``: the update starts the parameter
        all-gathers and returns; the next forward (eager in this mode) waits for each unit's just before
        the unit runs."""
        sharded_params = self.stage in (1, 2) and self.world_size > 1
        return self.overlap_param_gather and self.overlap_comm and sharded_params

    @property
    def per_param_grads(self) -> bool:
        """One process and no stage-3 runner: nothing needs a flat gradient for communication, so
        backward returns per-parameter gradients and the update concatenates them in its own pass."""
        return self.world_size == 1 and self.stage < 3

    def unscale(self, scale: torch.Tensor) -> torch.Tensor:
        """Gradients arrive as the sum over ranks of d(loss * scale / GAS), pre-divided by
        ``gradient_predivide_factor`` before a collective (stages 0-2); times this factor they are
        the mean gradient."""
        numerator = self.predivide_factor if 1 < self.world_size and self.stage < 3 else 1.0
        return numerator * self.sequence_parallel_size / (scale * self.world_size)


def plan_of_config(
    config: Any, layouts: dict[str, FlatLayout], *, world_size: int, rank: int, **fields: Any
) -> StepPlan:
    """The plan a DeepSpeed config decides over ``layouts`` (``fields`` set the rest, e.g.
    ``offload_optimizer``); the plain and the pipeline engine build theirs with it."""
    zero = config.zero_optimization
    compute_dtype = compute_dtype_of(config)
    return StepPlan(
        layouts=layouts,
        stage=int(zero.stage),
        world_size=world_size,
        rank=rank,
        accumulation_steps=int(config.gradient_accumulation_steps),
        micro_batch_size=int(config.train_micro_batch_size_per_gpu),
        compute_dtype=compute_dtype,
        gradient_clipping=float(config.gradient_clipping),
        predivide_factor=float(config.gradient_predivide_factor),
        reduce_bucket_numel=int(zero.reduce_bucket_size) or None,
        allgather_bucket_numel=int(zero.allgather_bucket_size) or None,
        overlap_param_gather=bool(zero.overlap_param_gather),
        grad_accum_dtype=grad_accum_dtype_of(config.data_types.grad_accum_dtype, compute_dtype),
        master_dtype=master_dtype_of(config),
        sequence_parallel_size=config.sequence_parallel_size,
        **fields,
    )


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank's step (dropout and friends): distinct, reproducible streams per
    (seed, step, rank)."""
    return (seed * 1_000_003 + step * 7_919 + rank) % (2**63 - 1)


def compose(
    forward: Callable[[Flats, Any], torch.Tensor],
    scaled_backward: Callable[..., tuple[torch.Tensor, Flats]],
    reduce_scatter: Reducer,
    sharded_update: Callable[..., Any],
) -> Callable[..., Any]:
    """Build ``step(flats, micro_batches, scale, *, vote=None, failure=None, **update_args) -> update
    result`` from the four phases.

    ``reduce_scatter`` sees every micro-batch's gradients (``add``) and hands the reduced, accumulated
    ones to the update (``result``); it may also start its collectives from inside the backward pass
    through per-group gradient hooks (``grad_hooks``) or its ``grad_sink``, so communication overlaps the
    rest of backward.

    On several ranks ``vote`` (a ``step_failure.StepVote``) keeps a step that fails on one rank from
    pairing with the others' next one (core/step_failure.py): a micro-batch whose backward communicates
    (or, at stage 3, whose forward does) votes between its forward and its backward; after a failure in
    one that does not, this rank issues the reducer's collectives with zero gradients and
    sharded_update's graph A carries the failure. ``failure``: an error this rank raised before the step
    (its batch was refused); the step then only keeps the other ranks company and raises it.
    """
    communicates = bool(getattr(scaled_backward, "communicates", False))  # stage 3: in forward too

    def step(
        flats: Flats,
        micro_batches: list[Any],
        scale: torch.Tensor,
        vote: StepVote | None = None,
        failure: BaseException | None = None,
        timers: WallClockTimers | None = None,
        **update_args: Any,
    ) -> Any:
        def phase(name: str) -> Any:  # wall_clock_breakdown: each phase timed; off, nothing at all
            return _UNTIMED if timers is None else timers.timing(name)

        reduce_scatter.reset()  # a step that raised midway must not leak its partial sums into this one
        losses = []
        for i, micro_batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            hooks = reduce_scatter.grad_hooks(last)
            sink = reduce_scatter.grad_sink
            votes = vote if vote is not None and (communicates or hooks or sink) else None
            if failure is None:
                cast = vote.votes if vote is not None else 0
                try:
                    with phase(FORWARD_BACKWARD_TIMER):
                        loss, grads = scaled_backward(forward, flats, micro_batch, scale, hooks, sink, votes)
                except RemoteStepError:
                    raise
                except Exception as error:
                    if vote is None or vote.failed_here:  # one rank; or stage 3 voted "failed" itself
                        raise
                    if vote.votes > cast:  # the backward had begun exchanging gradients
                        raise _out_of_step(error) from error
                    failure = error
            if failure is not None:
                if votes is not None:
                    getattr(scaled_backward, "placeholder", _vote_failed)(flats, votes)
                    raise failure
                # the collectives this micro-batch's gradients would have gone through, with zeros
                grads = {g: torch.zeros_like(f) for g, f in flats.items()}
                loss = torch.zeros((), dtype=torch.float32, device=next(iter(flats.values())).device)
            with phase(BACKWARD_REDUCE_GLOBAL_TIMER):
                reduce_scatter.add(grads, last)
            losses.append(loss)
        if vote is not None:
            update_args["failed"] = failure is not None
        loss_sum = torch.stack(losses).sum()
        try:
            with phase(BACKWARD_REDUCE_GLOBAL_TIMER):
                reduced = reduce_scatter.result()
            with phase(STEP_GLOBAL_TIMER):
                return sharded_update(reduced, loss_sum, scale=scale, **update_args)
        except RemoteStepError:
            if failure is not None:
                raise failure from None
            raise

    return step


def _vote_failed(flats: Flats, vote: StepVote) -> None:
    vote.vote(True)


def _out_of_step(error: BaseException) -> RanksOutOfStepError:
    return RanksOutOfStepError(
        f"engine.step raised while exchanging gradients with the other ranks ({type(error).__name__}: "
        f"{error}); they cannot be told, so this engine refuses further steps (the other ranks fail in "
        "that exchange, at the process group's timeout at the latest)"
    )


# ----------------------------------------------------------------------------------------------
# 1. forward


class _LossModule(nn.Module):
    """Wraps the user's module so ``functional_call`` can run ``loss_fn(model, batch)`` on new params."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        if self.loss_fn is not None:
            out = self.loss_fn(self.model, batch)
        elif isinstance(batch, dict):
            out = self.model(**batch)
        else:
            out = self.model(batch)
        return loss_of_output(out)


def _prefixed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # names as ``_LossModule`` sees them: the user's module is its ``model`` child
    return {"model." + n: t for n, t in tensors.items()}


def loss_of_output(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None:
        loss = out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"the loss must be a scalar (0-d) tensor, got {shape}; reduce it (e.g. .mean()) in loss_fn"
        )
    return loss


def make_forward(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    layouts: dict[str, FlatLayout],
    constants: dict[str, torch.Tensor],
) -> Callable[[Flats, Any], torch.Tensor]:
    """``constants``: buffers and frozen parameters (in compute dtype), by module-relative name."""
    wrapper = _LossModule(model, loss_fn)
    prefixed_constants = _prefixed(constants)

    def forward(flats: Grads, micro_batch: Any) -> torch.Tensor:
        # a group is its flat buffer (split into views here) or the list of its parameter tensors
        tensors = dict(prefixed_constants)
        for group, flat in flats.items():
            pieces = layouts[group].split(flat) if isinstance(flat, torch.Tensor) else flat
            for name, tensor in zip(layouts[group].names, pieces):
                tensors["model." + name] = tensor
        return torch.func.functional_call(wrapper, tensors, (micro_batch,), strict=False)

    return forward


def make_module_forward(
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None, constants: dict[str, torch.Tensor]
) -> Callable[[nn.Module, Any], torch.Tensor]:
    """Stage 3's forward: the loss of ``module`` as ``parallel.zero3`` has patched it, unit by unit."""
    prefixed_constants = _prefixed(constants)

    def forward(module: nn.Module, micro_batch: Any) -> torch.Tensor:
        wrapper = _LossModule(module, loss_fn)
        return torch.func.functional_call(wrapper, prefixed_constants, (micro_batch,), strict=False)

    return forward


# ----------------------------------------------------------------------------------------------
# 2. scaled_backward


def make_scaled_backward(plan: StepPlan, compile: bool) -> Callable[..., tuple[torch.Tensor, Grads]]:
    """Gradients of ``loss * scale / GAS`` w.r.t. the flat buffers (or, with ``per_param_grads``,
    w.r.t. each parameter's view of them), plus the unscaled fp32 loss. Given the reducer's ``sink``
    (stage 2) they come out as this rank's shard of each unit, reduce-scattered unit by unit inside an
    eager backward (``parallel.grad_sharding``; ``compile`` does not apply there)."""
    accumulation_steps = plan.accumulation_steps

    def objective(
        forward, flats: Flats, micro_batch: Any, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss = forward(flats, micro_batch).float()
        return loss * (scale / accumulation_steps), loss.detach()

    compiled = compile_private(objective, dynamic=False) if compile else objective

    def scaled_backward(
        forward, flats: Flats, micro_batch: Any, scale: torch.Tensor, hooks=None, sink=None, vote=None
    ):
        if sink is not None:
            # eagerly, on per-parameter leaves: each unit is reduce-scattered as soon as it is complete
            # (the shards go straight into the reducer's accumulator: nothing is left to return)
            backward = ShardedBackward(plan.layouts, flats, sink, sink.deliver)
            scaled, loss = objective(forward, backward.leaves, micro_batch, scale)
            if vote is not None:  # the backward communicates: every rank's forward must have succeeded
                vote()
            backward.run(scaled)
            return loss, {}
        if plan.per_param_grads:
            leaves = {
                g: [v.detach().requires_grad_(True) for v in plan.layouts[g].split(f)]
                for g, f in flats.items()
            }
        else:
            leaves = {g: f.detach().requires_grad_(True) for g, f in flats.items()}
            for g, hook in (hooks or {}).items():
                leaves[g].register_hook(hook)
        scaled, loss = compiled(forward, leaves, micro_batch, scale)
        if vote is not None:  # the backward communicates: every rank's forward must have succeeded
            vote()
        inputs = list(optree.tree_leaves(leaves))
        grads = torch.autograd.grad(scaled, inputs, allow_unused=True)
        # a parameter the forward never touched (an unused block) gets a zero gradient
        grads = [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, grads)]
        return loss, optree.tree_unflatten(optree.tree_structure(leaves), grads)

    return scaled_backward


def make_zero3_backward(runner: Any, accumulation_steps: int):
    """Stage 3: ``parallel.zero3`` gathers each unit just before use and reduce-scatters its gradient
    (a sum over ranks) into this rank's shard right after; runs eagerly (its hooks free and re-gather
    parameter storage, which the compiler does not trace). ``forward`` here is the module-level one
    (``make_module_forward``); there are no reducer hooks, the runner communicates itself.

    With a ``vote`` (several ranks) the ranks agree between forward and backward that every forward
    succeeded; a rank whose forward raised first issues the gathers the rest of its forward would have
    (``Zero3Session.complete_forward``), so the vote pairs with the others' (core/step_failure.py)."""

    def scaled_backward(
        forward, shards: Flats, micro_batch: Any, scale: torch.Tensor, hooks=None, sink=None, vote=None
    ):
        def call(module: nn.Module) -> torch.Tensor:
            return forward(module, micro_batch).float()

        with runner.session(shards) as session:
            try:
                loss = session.run(call)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(f"the loss must be a scalar tensor, got {type(loss).__name__}")
            except Exception:
                if vote is not None:
                    session.complete_forward()
                    vote.vote(True)
                raise
            if vote is not None:
                vote()
            grads = session.grads(loss * (scale / accumulation_steps))
        return loss.detach(), grads

    def placeholder(shards: Flats, vote: Any) -> None:
        """A micro-batch this rank cannot run: its forward's gathers, then a "failed" vote."""
        with runner.session(shards) as session:
            session.complete_forward()
            vote.vote(True)

    scaled_backward.communicates = True  # every micro-batch gathers parameters in forward
    scaled_backward.placeholder = placeholder
    return scaled_backward


# ----------------------------------------------------------------------------------------------
# 3. reduce_scatter: the Reducers in reducers.py


# ----------------------------------------------------------------------------------------------
# 4. sharded_update


def make_norm_and_loss(
    plan: StepPlan, group: Any, compile: bool
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Graph A: (global squared norm of the scaled, summed gradients, mean loss, and with ``failed``
    the count and rank sum of ranks whose step failed), one all-reduce."""
    world, mp = plan.world_size, plan.model_parallel

    def norm_and_loss(
        grads: Grads, loss_sum: torch.Tensor, failed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        sumsq = torch.zeros((), dtype=torch.float32, device=loss_sum.device)
        for g, grad in grads.items():
            if plan.stage == 0 and world > 1:
                # Every rank holds the same full gradient: each sums only its own slice.
                # (a unit of its own group: replicated over that group, each of whose ranks sums a slice)
                grad = plan.layouts[g].shard(grad, plan.unit_rank(g))
            if mp is not None:  # the parameters this rank counts (core/model_parallel.py)
                sumsq = sumsq + mp.sumsq(g, grad)
                continue
            for part in grad if isinstance(grad, list) else [grad]:
                sumsq = sumsq + part.float().pow(2).sum()
        parts = [sumsq, loss_sum.float() / plan.accumulation_steps]
        if failed is not None:  # [failed ranks, sum of their ranks] (core/step_failure.py)
            parts += [failed, failed * (plan.rank if mp is None else mp.world_rank)]
        packed = torch.stack(parts)
        if world > 1:
            packed = collectives.all_reduce_flat(packed, group, None)
        if mp is not None:
            packed = mp.complete(packed)
        return packed[0], packed[1] / world, packed[2:] if failed is not None else None

    return compile_private(norm_and_loss, dynamic=False, fullgraph=True) if compile else norm_and_loss


def make_apply_update(plan: StepPlan, optimizer: Any, group: Any, compile: bool) -> Callable[..., None]:
    """Graph B: unscale, clip, optimizer step on the fp32 shard, write back compute-dtype params: the
    whole buffer where params have the master's shape, else (stages 1-2) this rank's row of it
    (``param_rows``), which ``gather_params`` then all-gathers in place."""
    clip = plan.gradient_clipping

    def apply_update(
        grads: Flats,
        master: Flats,
        opt_state: Any,
        params: Flats,
        sumsq: torch.Tensor,
        scale: torch.Tensor,
        lr: torch.Tensor,
        beta1: torch.Tensor | None,
        param_rows: Flats | None,
    ) -> None:
        unscale = plan.unscale(scale)
        grad_scale = unscale
        if clip > 0:
            norm = torch.sqrt(sumsq) * unscale
            grad_scale = unscale * torch.clamp(clip / (norm + 1e-6), max=1.0)
        # per-parameter gradients (one process) are concatenated here, inside the optimizer's fused
        # kernel, rather than by a separate cat in backward
        grads32 = {
            g: (t if isinstance(t, torch.Tensor) else plan.layouts[g].concat(t)).float()  # [padded_numel]
            for g, t in grads.items()
        }
        # OneCycle's momentum cycle writes (beta1, 0.99) into the betas, as DeepSpeed does.
        beta2 = None if beta1 is None else ONE_CYCLE_BETA2
        # compute-dtype params take the updated values in the optimizer's own pass
        copies = params if plan.params_match_master and not plan.params_alias_master else param_rows
        optimizer.update_(
            grads32,
            opt_state,
            master,
            lr,
            grad_scale=grad_scale,
            beta1=beta1,
            beta2=beta2,
            param_copies=copies,
        )

    return compile_private(apply_update, dynamic=False, fullgraph=True) if compile else apply_update


class UpdateResult(NamedTuple):
    applied: bool  # False: non-finite gradients, nothing updated
    loss: torch.Tensor  # fp32 [], mean over micro-batches and ranks
    grad_norm: torch.Tensor  # fp32 [], unscaled global norm before clipping (inf/nan when skipped)
    gathers: ParamGathers | None  # stages 1-2 with defer_param_gather: all-gathers still in flight


def make_sharded_update(
    plan: StepPlan, optimizer: Any, group: Any, compile: bool, apply_update: Callable[..., None] | None = None
) -> Callable[..., Any]:
    """Phase 4 on the host: graph A, one finite flag read, graph B unless the step is skipped.
    ``apply_update``: graph B's replacement (``core.offload.HostUpdate``: the update on the host).

    Returns an ``UpdateResult``.
    """
    norm_and_loss = make_norm_and_loss(plan, group, compile)
    if apply_update is None:
        apply_update = make_apply_update(plan, optimizer, group, compile)
    flags: dict[tuple[bool, torch.device], torch.Tensor] = {}

    def sharded_update(
        grads: Flats,
        loss_sum: torch.Tensor,
        *,
        scale: torch.Tensor,
        master: Flats,
        opt_state: Any,
        params: Flats,
        lr: torch.Tensor,
        beta1: torch.Tensor | None,
        failed: bool | None = None,
        before_write: Callable[[bool], None] | None = None,
    ) -> UpdateResult:
        """``failed`` (several ranks, ``compose``): whether this rank's step failed; graph A sums it
        over the ranks and every rank raises ``RemoteStepError`` if any failed, before any write.
        ``before_write(applied)`` runs once the outcome is known and nothing is written yet (the engine
        updates the loss scale there, so an error in it leaves the state valid)."""
        flag = None
        if failed is not None:  # graph A's input; the two values are made once
            flag = flags.get((failed, loss_sum.device))
            if flag is None:
                flag = flags[(failed, loss_sum.device)] = torch.tensor(float(failed), device=loss_sum.device)
        sumsq, loss, failures = norm_and_loss(grads, loss_sum, flag)
        grad_norm = torch.sqrt(sumsq) * plan.unscale(scale)
        if failures is None:
            applied = bool(torch.isfinite(sumsq).item())
        else:  # one host read for both flags
            finite, count, rank_sum = torch.cat([torch.isfinite(sumsq).reshape(1).float(), failures]).tolist()
            if count:
                raise RemoteStepError(describe_remote_failure(int(count), int(rank_sum)))
            applied = bool(finite)
        if before_write is not None:
            before_write(applied)
        gathers = None
        if applied:
            rows = None if plan.params_match_master else param_rows(plan, params)
            apply_update(grads, master, opt_state, params, sumsq, scale, lr, beta1, rows)
            if rows is not None:
                gathers = gather_params(plan, params, group)
        return UpdateResult(applied, loss, grad_norm, gathers)

    return sharded_update


def param_rows(plan: StepPlan, params: Flats) -> Flats:
    """This rank's row [S] of every full compute-dtype buffer [N * S] (stages 1-2): its shard's place."""
    return {g: flat.view(plan.unit_size(g), -1)[plan.unit_rank(g)] for g, flat in params.items()}


class ParamGathers:
    """The parameter all-gathers of stages 1-2 still in flight, by group; each wait is idempotent."""

    def __init__(self, pending: dict[str, collectives.Pending]) -> None:
        self.pending = pending

    def wait(self, group: str) -> None:
        work = self.pending.pop(group, None)
        if work is not None:
            work.wait()

    def wait_all(self) -> None:
        for group in list(self.pending):  # in launch order, the order the ranks issued them
            self.wait(group)


def gather_params(plan: StepPlan, params: Flats, group: Any) -> ParamGathers | None:
    """Stages 1-2, after the update: all-gather every group's rows in place (eagerly, outside graph B,
    so no copy in or out of the collective). With ``defer_param_gather`` they are left running, in
    layout order (the root unit, then the blocks in module order), for the next forward."""
    pending = {
        g: collectives.all_gather_rows(
            flat, plan.group_of(g, group), plan.allgather_bucket_numel, async_op=True
        )
        for g, flat in params.items()
    }
    gathers = ParamGathers(pending)
    if plan.defer_param_gather:
        return gathers
    gathers.wait_all()
    return None
