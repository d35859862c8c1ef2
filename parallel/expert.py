"""Expert parallelism: expert groups, the all-to-all dispatch and combine, and the MoE layer's body.

Groups follow DeepSpeed's ``groups._create_expert_and_data_parallel`` (no tensor or pipeline
parallelism): with ``W`` ranks and ``ep_size = P``,

- expert-parallel groups are consecutive blocks ``[0..P-1], [P..2P-1], ...``: the ranks that split one
  layer's experts between them and exchange tokens by all-to-all;
- expert-data-parallel groups are the strided sets ``[i, i+P, i+2P, ...]``: the ranks holding the same
  experts, over which expert gradients are averaged (dense gradients go over the whole data-parallel group).

Rank ``r`` holds experts ``(r % P) * E/P ... (r % P + 1) * E/P - 1`` of every layer of that ``ep_size``.
Groups are named ``ep_size_<P>`` as in DeepSpeed and created once per name, collectively (every rank calls
``expert_groups`` with the same sizes in the same order; the MoE layer does it at construction when
``torch.distributed`` is up, else at its first forward).

The layer's body (``MOELayer``): gate -> routes; tokens scattered into an ``[E, C, M]`` buffer (a slot per
expert and capacity position); ``all_to_all_single`` sends each expert block to its owner; the owner runs
its local experts over the ``[P, E/P, C, M]`` it received; a second all-to-all brings results back; each
token sums its routes' outputs weighted by the gate. The all-to-all is its own adjoint, so backward is one
all-to-all per forward all-to-all.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zerostep.parallel.groups import block_layout
from zerostep.parallel.moe_gate import Routes, TopKGate


@dataclass(frozen=True)
class ExpertGroups:
    """This rank's expert-parallel and expert-data-parallel groups for one ``ep_size``."""

    name: str  # "ep_size_<P>", DeepSpeed's group name (parameters carry it as ``group_name``)
    ep_size: int
    ep_rank: int  # this rank's index in its expert-parallel group
    ep_group: dist.ProcessGroup | None  # None in one process
    ep_ranks: tuple[int, ...]
    edp_group: dist.ProcessGroup | None
    edp_ranks: tuple[int, ...]


def group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def expert_rank_layout(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(expert-parallel groups, expert-data-parallel groups) as rank lists for ``world_size`` ranks."""
    check_ep_size(ep_size, world_size)
    return block_layout(world_size, ep_size)


def check_ep_size(ep_size: int, world_size: int) -> None:
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive int, got {ep_size!r}")
    if ep_size > world_size:
        raise ValueError(f"ep_size={ep_size} is larger than the world size {world_size}")
    if world_size % ep_size:
        raise ValueError(f"the world size {world_size} is not divisible by ep_size={ep_size}")


# name -> groups, per default group (a new init_process_group starts over)
_GROUPS: weakref.WeakKeyDictionary[Any, dict[str, ExpertGroups]] = weakref.WeakKeyDictionary()
_SINGLE: dict[str, ExpertGroups] = {}


def expert_groups(ep_size: int) -> ExpertGroups:
    """This rank's groups for ``ep_size``, created (collectively, on every rank) on the first call."""
    if not (dist.is_available() and dist.is_initialized()):
        check_ep_size(ep_size, 1)
        return _SINGLE.setdefault(group_name(1), ExpertGroups(group_name(1), 1, 0, None, (0,), None, (0,)))
    world, rank = dist.get_world_size(), dist.get_rank()
    cache = _GROUPS.setdefault(dist.group.WORLD, {})
    name = group_name(ep_size)
    if name in cache:
        return cache[name]
    ep_lists, edp_lists = expert_rank_layout(world, ep_size)
    mine: dict[str, Any] = {}
    for ranks in edp_lists:  # DeepSpeed's order: expert-data-parallel groups first
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["edp"] = (group, tuple(ranks))
    for ranks in ep_lists:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["ep"] = (group, tuple(ranks))
    ep_group, ep_ranks = mine["ep"]
    edp_group, edp_ranks = mine["edp"]
    groups = ExpertGroups(name, ep_size, ep_ranks.index(rank), ep_group, ep_ranks, edp_group, edp_ranks)
    cache[name] = groups
    return groups


def known_expert_groups() -> dict[str, ExpertGroups]:
    """Every ``ExpertGroups`` this process created, by name."""
    if dist.is_available() and dist.is_initialized():
        return dict(_GROUPS.get(dist.group.WORLD, {}))
    return dict(_SINGLE)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with equal splits along dim 0; its gradient is the same exchange."""

    @staticmethod
    def forward(ctx: Any, group: dist.ProcessGroup, x: torch.Tensor) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, _AllToAll.apply(ctx.group, grad)


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Block ``i`` of ``x``'s dim 0 goes to rank ``i`` of ``group``; identity without a group."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(group, x)


def route_slots(routes: Routes) -> torch.Tensor:
    """[k, S] flat slot ``expert * C + location`` of each route, ``E * C`` (a scratch row) where dropped."""
    e, c = routes.num_experts, routes.capacity
    flat = routes.indices * c + routes.locations
    return torch.where(routes.indices >= 0, flat, torch.full_like(flat, e * c))


def dispatch(tokens: torch.Tensor, slots: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """[E, C, M]: each kept route's token in its slot, zeros in empty slots. ``tokens``: [S, M]."""
    k, s = slots.shape
    m = tokens.shape[1]
    buf = tokens.new_zeros(num_experts * cap + 1, m)  # + the scratch row dropped routes land in
    buf = buf.index_add(0, slots.reshape(-1), tokens.unsqueeze(0).expand(k, s, m).reshape(k * s, m))
    return buf[:-1].view(num_experts, cap, m)


def combine(expert_out: torch.Tensor, slots: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """[S, M]: sum over each token's routes of its slot's output times the route's gate (fp32 sum)."""
    e, c, m = expert_out.shape
    k, s = slots.shape
    padded = torch.cat([expert_out.reshape(e * c, m), expert_out.new_zeros(1, m)])
    routed = padded.index_select(0, slots.reshape(-1)).view(k, s, m)
    return (routed.float() * gates.unsqueeze(-1)).sum(0).to(expert_out.dtype)


class Experts(nn.Module):
    """DeepSpeed's ``Experts``: ``num_local_experts`` deep copies of ``expert`` (this rank's share of the
    layer's experts), their parameters marked ``allreduce = False`` and ``group_name`` (what
    ``is_moe_param`` goes by).

    As in DeepSpeed, a rank holds only its own experts: local expert ``i`` is the layer's global expert
    ``first_local + i`` (``first_local`` is set once the expert-parallel groups exist). The engine makes
    them a unit of their own (core/expert_units.py), reduced and ZeRO-sharded over the expert-data-parallel
    group, and checkpoints them under their global names (``global_expert_name``).
    """

    def __init__(
        self,
        expert: nn.Module,
        num_local_experts: int = 1,
        expert_group_name: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(expert, nn.Module):
            raise TypeError(f"expert must be a torch.nn.Module, got {type(expert).__name__}")
        self.deepspeed_experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_local_experts))
        self.num_local_experts = num_local_experts
        self.first_local = 0
        self.expert_group_name = expert_group_name
        for e in self.deepspeed_experts:
            for p in e.parameters():
                p.allreduce = False
                p.group_name = expert_group_name

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # inputs: [P, E/P, C, M] (source rank, local expert, slot, model); expert i sees [P, 1, C, M]
        chunks = inputs.chunk(self.num_local_experts, dim=1)
        outs = []
        for chunk, expert in zip(chunks, self.deepspeed_experts, strict=True):
            out = expert(chunk)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs, dim=1)


_EXPERTS = ".deepspeed_experts."


def expert_index(name: str) -> tuple[str, int, str] | None:
    """``(head, index, rest)`` of a parameter name ``head.deepspeed_experts.<index>.rest``, else None."""
    if _EXPERTS not in name:
        return None
    head, tail = name.rsplit(_EXPERTS, 1)
    index, _, rest = tail.partition(".")
    if not index.isdigit():
        return None
    return head, int(index), rest


def global_expert_name(name: str, first_local: int) -> str:
    """Local expert ``i``'s parameter name on a rank whose first expert is ``first_local`` -> the name
    global expert ``first_local + i`` has in one process holding every expert (names of non-expert
    parameters are returned as they are)."""
    parts = expert_index(name)
    if parts is None:
        return name
    head, index, rest = parts
    return _expert_name(head, first_local + index, rest)


def local_expert_name(name: str, first_local: int, num_local: int) -> str | None:
    """The inverse of ``global_expert_name``: the local name, or None when the expert is another rank's."""
    parts = expert_index(name)
    if parts is None:
        return name
    head, index, rest = parts
    if not first_local <= index < first_local + num_local:
        return None
    return _expert_name(head, index - first_local, rest)


def _expert_name(head: str, index: int, rest: str) -> str:
    return f"{head}{_EXPERTS}{index}.{rest}" if rest else f"{head}{_EXPERTS}{index}"


class MOELayer(nn.Module):
    """Gate, dispatch, experts, combine (DeepSpeed's ``MOELayer``); ``l_aux`` and ``exp_counts`` are kept
    on the module after each forward, as DeepSpeed does."""

    def __init__(
        self, gate: TopKGate, experts: Experts, ep_group_name: str, ep_size: int, num_local_experts: int
    ):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.ep_group: dist.ProcessGroup | None = None
        self.ep_size = ep_size
        self.ep_group_name = ep_group_name
        self.num_local_experts = num_local_experts
        self.l_aux: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None
        self.last_all_to_all_bytes = 0  # bytes this rank sent in the forward's two all-to-alls

    def _set_ep_group(self, ep_group: dist.ProcessGroup | None) -> None:
        self.ep_group = ep_group
        self.gate._set_ep_group(ep_group)

    @torch.compiler.disable  # host-side capacity, collectives and data-dependent shapes: run eagerly
    def forward(self, hidden: torch.Tensor, used_token: torch.Tensor | None = None) -> torch.Tensor:
        m = hidden.shape[-1]
        tokens = hidden.reshape(-1, m)  # [S, M]
        routes = self.gate.routes(tokens, used_token)
        self.l_aux, self.exp_counts = routes.l_aux, routes.exp_counts
        e, c = routes.num_experts, routes.capacity
        slots = route_slots(routes)
        sent = dispatch(tokens, slots, e, c)  # [E, C, M]
        received = all_to_all(sent, self.ep_group)  # [P * E/P, C, M], source-rank major
        out = self.experts(received.reshape(self.ep_size, self.num_local_experts, c, m))
        back = all_to_all(out.reshape(e, c, m), self.ep_group)  # [E, C, M] in global expert order
        if self.ep_size > 1:
            self.last_all_to_all_bytes = (
                2 * sent.numel() * sent.element_size() * (self.ep_size - 1) // self.ep_size
            )
        return combine(back, slots, routes.gates).reshape(hidden.shape)
