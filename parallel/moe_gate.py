"""Top-k gating for Mixture of Experts, with DeepSpeed's ``TopKGate`` semantics (GShard / Switch).

A gate turns a ``[S, M]`` block of tokens into *routes*: for each of the ``k`` choices of every token, the
expert it goes to, its slot (location) in that expert's capacity buffer and its combine weight. A route
the capacity evicted has expert index ``-1``. Everything here is computed in fp32.

What DeepSpeed 0.19 does, and so what these functions do:

- capacity ``C = max(ceil(S / E * capacity_factor * k'), min_capacity)`` with ``k' = 1`` for top-1 and
  ``k' = k`` otherwise; with ``drop_tokens=False`` it is the largest per-expert count instead (the max
  over the expert-parallel group, so every rank's all-to-all moves equal blocks), and for top-1 at most S.
- top-1: expert ``argmax(softmax(logits))`` (with ``RSample``, argmax of the logits plus Gumbel noise);
  when an expert gets more than C tokens, it keeps C of them: at random with ``use_rts`` (random token
  selection: the top C of uniform scores), else the top C of the 0/1 mask itself (which of the tied
  tokens ``torch.topk`` keeps is its own choice, as in DeepSpeed); kept tokens take slots in token
  order; the combine weight is the raw softmax value. Fewer tokens than ``min_capacity`` is an error.
  ``l_aux = E * sum_e mean_s(gates)_e * mean_s(mask1)_e``.
- top-2: first expert as top-1 (no noise), the second the argmax of the logits (plus Gumbel noise when
  ``top2_2nd_expert_sampling``) with the first masked out; slots of the second choices come after every
  first choice of that expert; routes whose slot is ``>= C`` are dropped; the two kept weights are
  renormalised to sum to one. ``l_aux = E^2 * mean_e(me * ce)`` with ``ce`` from the first choices.
- top-k, k > 2: the k largest gates; with dropping each expert keeps its C highest-gate tokens
  (DeepSpeed's ``drop_policy="probs"``); weights renormalised over the kept routes;
  ``l_aux = E^2 / k * mean_e(me * ce)`` with ``ce`` from all k choices.
- ``exp_counts``: per-expert routes chosen, before the capacity drops anything.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")


class Routes(NamedTuple):
    """A gate's decision for ``S`` tokens and ``k`` choices each."""

    l_aux: torch.Tensor  # scalar, fp32, differentiable w.r.t. the gate's logits
    capacity: int  # slots per expert
    num_experts: int
    indices: torch.Tensor  # [k, S] int64 expert of each route, -1 where the capacity dropped it
    locations: torch.Tensor  # [k, S] int64 slot within that expert's buffer (0 where dropped)
    gates: torch.Tensor  # [k, S] fp32 combine weight (0 where dropped), differentiable
    exp_counts: torch.Tensor  # [E] int64 routes chosen per expert before dropping (detached)


def capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert: ``max(ceil(num_tokens / num_experts * capacity_factor), min_capacity)``."""
    return max(math.ceil(num_tokens / num_experts * capacity_factor), int(min_capacity))


def _no_drop_capacity(counts: torch.Tensor, ep_group: dist.ProcessGroup | None) -> int:
    """The largest per-expert count, agreed over the expert-parallel group (one host read)."""
    needed = counts.max().reshape(1).to(torch.int64)
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(needed, op=dist.ReduceOp.MAX, group=ep_group)
    return int(needed.item())


def _keep_per_expert(scores: torch.Tensor, mask: torch.Tensor, cap: int) -> torch.Tensor:
    """``mask`` ([S, E], bool) with at most ``cap`` tokens kept per expert: those of the highest
    ``scores`` ([S, E]); the rest of each column is cleared."""
    take = min(cap, scores.shape[0])  # topk cannot select more rows than there are tokens
    if take == 0:
        return torch.zeros_like(mask)
    top = torch.topk(scores, k=take, dim=0).indices  # [take, E]
    chosen = torch.zeros_like(mask).scatter_(0, top, True)
    return mask & chosen


def _gumbel(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    # -log(-log(u)), u uniform in (0, 1) kept away from 0 and 1 so both logs stay finite
    tiny = torch.finfo(like.dtype).tiny
    u = torch.rand(shape, dtype=like.dtype, device=like.device).clamp_(
        tiny, 1.0 - torch.finfo(like.dtype).eps
    )
    return -torch.log(-torch.log(u))


def top1_routes(
    logits: torch.Tensor,
    capacity_factor: float,
    min_capacity: int,
    used_token: torch.Tensor | None = None,
    noisy_gate_policy: str | None = None,
    drop_tokens: bool = True,
    use_rts: bool = True,
    ep_group: dist.ProcessGroup | None = None,
) -> Routes:
    """Top-1 (Switch) routing of ``logits`` ([S, E], fp32)."""
    num_tokens, num_experts = logits.shape
    gates = F.softmax(logits, dim=1)  # [S, E]
    if noisy_gate_policy == "RSample":
        choice = torch.argmax(logits + _gumbel(logits.shape, logits), dim=1)
    else:
        choice = torch.argmax(gates, dim=1)  # [S]
    mask = F.one_hot(choice, num_classes=num_experts)  # [S, E] int64
    if used_token is not None:
        mask = mask * used_token.reshape(-1, 1).to(mask.dtype)
    exp_counts = mask.sum(dim=0).detach()
    if num_tokens < min_capacity:
        raise ValueError(
            f"top-1 gating got {num_tokens} tokens, fewer than min_capacity={min_capacity}: "
            "set min_capacity lower (0 works) or give the layer more tokens"
        )
    if drop_tokens:
        cap = capacity(num_tokens, num_experts, capacity_factor, min_capacity)
    else:
        cap = min(_no_drop_capacity(exp_counts, ep_group), num_tokens)

    me = gates.mean(dim=0)
    ce = mask.float().mean(dim=0)
    l_aux = (me * ce).sum() * num_experts

    routed = mask.bool()
    scores = mask * torch.rand(mask.shape, device=mask.device) if use_rts else mask
    kept = _keep_per_expert(scores, routed, cap)
    locations = (torch.cumsum(kept.long(), dim=0) - 1) * kept  # [S, E]
    has_slot = kept.any(dim=1)  # [S]
    indices = torch.where(has_slot, choice, torch.full_like(choice, -1))
    location = locations.sum(dim=1)
    weight = (gates * kept).sum(dim=1)  # raw softmax value, 0 where dropped
    return Routes(l_aux, cap, num_experts, indices[None], location[None], weight[None], exp_counts)


def top2_routes(
    logits: torch.Tensor,
    capacity_factor: float,
    min_capacity: int,
    drop_tokens: bool = True,
    ep_group: dist.ProcessGroup | None = None,
    top2_2nd_expert_sampling: bool = True,
) -> Routes:
    """Top-2 (GShard) routing of ``logits`` ([S, E], fp32)."""
    num_tokens, num_experts = logits.shape
    gates = F.softmax(logits, dim=1)
    first = torch.argmax(gates, dim=1)
    mask1 = F.one_hot(first, num_classes=num_experts)  # [S, E]
    second_scores = logits + _gumbel(logits.shape, logits) if top2_2nd_expert_sampling else logits
    second = torch.argmax(second_scores.masked_fill(mask1.bool(), float("-inf")), dim=1)
    mask2 = F.one_hot(second, num_classes=num_experts)

    # every second choice of an expert queues behind all of its first choices
    loc1 = torch.cumsum(mask1, dim=0) - 1
    loc2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)

    me = gates.mean(dim=0)
    ce = mask1.float().mean(dim=0)
    l_aux = (me * ce).mean() * num_experts * num_experts
    exp_counts = (mask1 + mask2).sum(dim=0).detach()

    if drop_tokens:
        cap = capacity(num_tokens, num_experts, capacity_factor * 2, min_capacity)
        mask1 = mask1 * (loc1 < cap)
        mask2 = mask2 * (loc2 < cap)
    else:
        cap = _no_drop_capacity(exp_counts, ep_group)

    g1 = (gates * mask1).sum(dim=1)  # [S], 0 where dropped
    g2 = (gates * mask2).sum(dim=1)
    denom = torch.clamp(g1 + g2, min=torch.finfo(gates.dtype).eps)
    kept1, kept2 = mask1.any(dim=1), mask2.any(dim=1)
    indices = torch.stack(
        [
            torch.where(kept1, first, -torch.ones_like(first)),
            torch.where(kept2, second, -torch.ones_like(second)),
        ]
    )
    locations = torch.stack([(loc1 * mask1).sum(dim=1), (loc2 * mask2).sum(dim=1)])
    weights = torch.stack([g1 / denom, g2 / denom])
    return Routes(l_aux, cap, num_experts, indices, locations, weights, exp_counts)


def topk_routes(
    logits: torch.Tensor,
    k: int,
    capacity_factor: float,
    min_capacity: int,
    drop_tokens: bool = True,
    ep_group: dist.ProcessGroup | None = None,
) -> Routes:
    """Top-k routing (k > 2) of ``logits`` ([S, E], fp32); each expert keeps its highest-gate tokens."""
    num_tokens, num_experts = logits.shape
    gates = F.softmax(logits, dim=1)
    top_gate, top_idx = torch.topk(gates, k=k, dim=1)  # [S, k]
    mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top_idx, True)  # [S, E]
    exp_counts = mask.sum(dim=0).detach()
    me = gates.mean(dim=0)
    ce = mask.float().mean(dim=0)
    l_aux = (me * ce).mean() * num_experts * num_experts / k
    if drop_tokens:
        cap = capacity(num_tokens, num_experts, capacity_factor * k, min_capacity)
        scores = torch.zeros_like(gates).scatter(1, top_idx, top_gate)
        mask = _keep_per_expert(scores, mask, cap)
    else:
        cap = _no_drop_capacity(exp_counts, ep_group)
    locations = (torch.cumsum(mask.long(), dim=0) - 1) * mask  # [S, E]
    masked = gates * mask
    masked = masked / torch.clamp(masked.sum(dim=1, keepdim=True), min=torch.finfo(gates.dtype).eps)
    kept = mask.gather(1, top_idx)  # [S, k]
    indices = torch.where(kept, top_idx, torch.full_like(top_idx, -1))
    return Routes(
        l_aux,
        cap,
        num_experts,
        indices.t().contiguous(),
        locations.gather(1, top_idx).t().contiguous(),
        masked.gather(1, top_idx).t().contiguous(),
        exp_counts,
    )


def dense_combine(routes: Routes) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSpeed's dense form of ``routes``: ``combine_weights`` [S, E, C] (fp32) and ``dispatch_mask``
    (its ``bool``): the weight of token s in slot c of expert e."""
    k, num_tokens = routes.indices.shape
    e, c = routes.num_experts, routes.capacity
    kept = routes.indices >= 0
    flat = torch.where(kept, routes.indices * c + routes.locations, torch.full_like(routes.indices, e * c))
    combine = routes.gates.new_zeros(num_tokens, e * c + 1)
    tokens = torch.arange(num_tokens, device=flat.device).expand(k, num_tokens)
    combine = combine.index_put(
        (tokens.reshape(-1), flat.reshape(-1)), routes.gates.reshape(-1), accumulate=True
    )
    combine = combine[:, : e * c].reshape(num_tokens, e, c)
    return combine, combine.bool()


def check_gate_args(num_experts: int, k: int, noisy_gate_policy: str | None) -> None:
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > num_experts:
        raise ValueError(
            f"k={k} is larger than num_experts={num_experts}: a token cannot pick more experts than exist"
        )
    if noisy_gate_policy not in NOISY_GATE_POLICIES:
        raise ValueError(
            f"noisy_gate_policy must be one of None, 'Jitter', 'RSample'; got {noisy_gate_policy!r}"
        )


class TopKGate(nn.Module):
    """DeepSpeed's ``TopKGate``: a bias-free linear ``wg`` from ``model_dim`` to ``num_experts`` logits, then
    top-k routing. ``forward`` returns DeepSpeed's ``(l_aux, combine_weights, dispatch_mask, exp_counts)``;
    ``routes`` the sparse form the MoE layer dispatches with."""

    def __init__(
        self,
        model_dim: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 8,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        ep_group: dist.ProcessGroup | None = None,
        top2_2nd_expert_sampling: bool = True,
    ) -> None:
        super().__init__()
        check_gate_args(num_experts, k, noisy_gate_policy)
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.ep_group = ep_group
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.noisy_gate_policy = None if noisy_gate_policy == "None" else noisy_gate_policy
        self.drop_tokens = drop_tokens
        self.use_rts = use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling

    def _set_ep_group(self, ep_group: dist.ProcessGroup | None) -> None:
        self.ep_group = ep_group

    def routes(self, tokens: torch.Tensor, used_token: torch.Tensor | None = None) -> Routes:
        """Routes of ``tokens`` ([S, M], any float dtype; computed in fp32)."""
        x = tokens.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            # multiplicative jitter in [1 - 1e-2, 1 + 1e-2) (Switch Transformer)
            x = x * torch.empty_like(x).uniform_(1.0 - 1e-2, 1.0 + 1e-2)
        logits = F.linear(x, self.wg.weight.float())  # [S, E]
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            policy = self.noisy_gate_policy if self.training else None
            return top1_routes(
                logits,
                factor,
                self.min_capacity,
                used_token,
                policy,
                self.drop_tokens,
                self.use_rts,
                self.ep_group,
            )
        if used_token is not None:
            raise ValueError("used_token is only supported with k=1 (as in DeepSpeed)")
        if self.k == 2:
            return top2_routes(
                logits,
                factor,
                self.min_capacity,
                self.drop_tokens,
                self.ep_group,
                self.top2_2nd_expert_sampling,
            )
        return topk_routes(logits, self.k, factor, self.min_capacity, self.drop_tokens, self.ep_group)

    def forward(
        self, input: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.routes(input, used_token)
        combine, dispatch = dense_combine(r)
        return r.l_aux, combine, dispatch, r.exp_counts
