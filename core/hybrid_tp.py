"""Tensor-parallel generation for the hybrid engine (``hybrid_engine.inference_tp_size`` N > 1).

As DeepSpeed's hybrid engine does, the training ranks are regrouped for generation into inference
tensor-parallel groups of N consecutive ranks (world 4, N 2: {0, 1} {2, 3}), and each ``generate`` runs
on the trained weights split over its group with AutoTP's policies (core/autotp.py, the inference
engine's and AutoTP training's: q/k/v and MLP up projections column-wise, attention output and down
projection row-wise, vocab-parallel embedding and gathered LM head).

- Built once, when the engine is: a *skeleton* of the module, a copy whose parameters are on the meta
  device (no memory) at their full shapes, sharded in place (``shard_module``) for this rank of its
  group: this checks the plan (heads, hidden sizes divisible by N) before training starts.
- Each call: the full weights (the module's own at stages 0-2, views of the state; at stage 3 gathered
  into the module for the build and released right after) are cut into this rank's shards
  (``shard_of_full``; replicated tensors are shared at stages 0-2, copied at 3) and put into the
  skeleton; generation runs tensor-parallel; afterwards the skeleton's parameters go back to meta, so
  the shards live only during the call.
- Prompts: every rank of a group must run the same forwards, so each member's call (its arguments,
  sent over the group with ``broadcast_object_list``) runs in turn on all members, member 0 first, and
  each keeps its own result: a rank's tokens are those of a plain ``generate`` of its own call. DeepSpeed
  instead concatenates the members' ``input_ids`` along the batch dimension into one call (its prompts
  must then have one shape); zerostep's order works for any ``generate`` signature (zerostep GPT's 1-D
  prompt too), at N calls per group instead of one. Samplers that draw from the global generator see
  the members' calls in that order on every rank (the ranks' generators were made equal at start-up).

Not combined with training's own model parallelism (``tensor_parallel.autotp_size``, ``mpu=``): a clear
error (the training shards would first have to be reassembled).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zerostep.core.module_binding import gather_released, logical_shape, release_gathered
from zerostep.parallel.groups import block_layout
from zerostep.parallel.mesh import check_tp_size
from zerostep.parallel.tensor_parallel import ShardSpec, shard_of_full

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_groups: dict[tuple[int, int], tuple[Any, list[int]]] = {}  # (id(world), N) -> (this rank's group, members)


def inference_groups(tp_size: int) -> tuple[Any, list[int]]:
    """This rank's inference tensor-parallel group and its members (global ranks): blocks of
    ``tp_size`` consecutive ranks. Collective on first use per size (every rank creates every group)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    check_tp_size(tp_size, world, "hybrid_engine.inference_tp_size")
    key = (id(dist.group.WORLD), tp_size)
    if key not in _groups:
        blocks, _ = block_layout(world, tp_size)
        mine = None
        for members in blocks:
            group = dist.new_group(members)
            if rank in members:
                mine = (group, members)
        _groups[key] = mine
    return _groups[key]


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with meta parameters of the full (logical) shapes, sharing its hooks (a
    deep copy of a hook would copy whatever object it is bound to) and without the instance-level
    ``generate`` the hybrid engine installed."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty(logical_shape(p), dtype=p.dtype, device="meta"), False)
    for m in model.modules():
        for name in _HOOK_DICTS:
            for hook in getattr(m, name, {}).values():
                memo[id(hook)] = hook
    skeleton = copy.deepcopy(model, memo)
    skeleton.__dict__.pop("generate", None)
    return skeleton


class TensorParallelGeneration:
    """``generate`` over an inference tensor-parallel group (module docstring)."""

    def __init__(self, core: Any, generate: Callable[..., Any], tp_size: int) -> None:
        from zerostep.core.autotp import tp_plan
        from zerostep.parallel.tensor_parallel import shard_module

        if not core.mesh.is_world:
            raise ValueError(
                f"hybrid_engine.inference_tp_size = {tp_size} with training model parallelism "
                f"({core.mesh.describe()}): not supported; zerostep regroups a data-parallel world only "
                "(drop tensor_parallel.autotp_size / mpu=, or set inference_tp_size to 1)"
            )
        if not dist.is_initialized():
            raise ValueError(
                f"hybrid_engine.inference_tp_size = {tp_size} needs torch.distributed on a multiple of "
                f"{tp_size} ranks; this process runs alone"
            )
        func = getattr(generate, "__func__", None)
        if func is None or getattr(generate, "__self__", None) is not core.model:
            raise ValueError(
                f"hybrid_engine.inference_tp_size = {tp_size}: {type(core.model).__name__}.generate must "
                "be a method of the model's class (it runs on a tensor-parallel copy of the model)"
            )
        self.group, self.members = inference_groups(tp_size)
        self.tp_size, self.rank = tp_size, self.members.index(dist.get_rank())
        self.core = core
        model = core.model
        self.skeleton = _skeleton(model)
        plan = tp_plan(self.skeleton, tp_size)
        self.specs: dict[str, ShardSpec] = shard_module(self.skeleton, plan, self.group)
        self._generate = func.__get__(self.skeleton)
        # each skeleton parameter once (ties share one), with the names of the module's parameters it holds
        self._slots: list[tuple[nn.Module, str, nn.Parameter, str]] = []
        seen: dict[int, str] = {}
        for path, module in self.skeleton.named_modules(remove_duplicate=False):
            for leaf, p in module._parameters.items():
                if p is None:
                    continue
                name = f"{path}.{leaf}" if path else leaf
                self._slots.append((module, leaf, p, seen.setdefault(id(p), name)))
        self.last_shard_bytes = 0  # the shards the last call held (one rank)

    def generate(self, args: tuple, kwargs: dict, wrap: Callable[[Callable], Callable]) -> Any:
        """Every member's call in turn, tensor-parallel; this rank's result. ``wrap``: the engine's
        autocast around a generate function. Collective over the group."""
        originals = dict(self.core.model.named_parameters(remove_duplicate=False))
        gathered = gather_released(list(self.core.model.parameters()))  # stage 3: collective, world
        try:
            shards = self._shards(originals, copy_replicated=bool(gathered))
        finally:
            if gathered:
                release_gathered(gathered, None)
        self._fill(shards)
        try:
            call = wrap(self._generate)
            mine = None
            for q, member in enumerate(self.members):
                sent = [args, kwargs] if q == self.rank else [None, None]
                dist.broadcast_object_list(sent, src=member, group=self.group)
                out = call(*sent[0], **sent[1])
                if q == self.rank:
                    mine = out
            return mine
        finally:
            self._fill(None)

    def _shards(self, originals: dict[str, torch.Tensor], copy_replicated: bool) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for _, _, _, name in self._slots:
            if name in out:
                continue
            full = originals[name].detach()
            spec = self.specs.get(name)
            if spec is not None and spec.sharded:
                out[name] = shard_of_full(full, spec, self.rank).clone()  # own storage: [local shape]
            else:
                out[name] = full.clone() if copy_replicated else full
        self.last_shard_bytes = sum(t.numel() * t.element_size() for t in out.values())
        return out

    def _fill(self, values: dict[str, torch.Tensor] | None) -> None:
        """Put ``values`` into the skeleton's parameters (ties stay tied), or (None) the meta ones back."""
        made: dict[str, nn.Parameter] = {}
        for module, leaf, meta, name in self._slots:
            if values is None:
                module._parameters[leaf] = meta
            else:
                if name not in made:
                    made[name] = nn.Parameter(values[name], requires_grad=False)
                module._parameters[leaf] = made[name]
