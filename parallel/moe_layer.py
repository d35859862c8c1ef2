"""DeepSpeed's ``deepspeed.moe.layer.MoE`` (``zerostep.moe.layer.MoE``): ``output, l_aux, exp_counts =
moe(hidden_states)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zerostep.parallel import expert as ep
from zerostep.parallel.moe_gate import TopKGate, check_gate_args


class MoE(nn.Module):
    """A Mixture-of-Experts layer with DeepSpeed's constructor and forward contract.

    ``num_experts`` copies of ``expert`` split over ``ep_size`` ranks (each holds and runs its
    ``num_experts / ep_size``, the global experts from ``first_expert`` on; ``parallel.expert.Experts``), a
    top-``k`` gate (``TopKGate``), and with ``use_residual`` a dense ``expert`` mixed in by a learned
    2-way softmax (Residual MoE). The expert-parallel groups are created when ``torch.distributed`` is up
    at construction, else at the first forward (``set_deepspeed_parallelism`` does it explicitly).
    ``use_tutel`` and ``enable_expert_tensor_parallelism`` are DeepSpeed options zerostep does not
    implement; passing them true raises.
    """

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module,
        num_experts: int = 1,
        ep_size: int = 1,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        use_residual: bool = False,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        use_tutel: bool = False,
        enable_expert_tensor_parallelism: bool = False,
        top2_2nd_expert_sampling: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(expert, nn.Module):
            raise TypeError(f"MoE: expert must be a torch.nn.Module, got {type(expert).__name__}")
        check_gate_args(num_experts, k, noisy_gate_policy)
        if not isinstance(ep_size, int) or ep_size < 1:
            raise ValueError(f"MoE: ep_size must be a positive int, got {ep_size!r}")
        if num_experts % ep_size:
            raise ValueError(f"MoE: num_experts={num_experts} is not divisible by ep_size={ep_size}")
        if use_tutel or enable_expert_tensor_parallelism:
            raise NotImplementedError("MoE: use_tutel and enable_expert_tensor_parallelism are not supported")
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = False
        self.ep_size = ep_size
        self.expert_group_name = ep.group_name(ep_size)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        gate = TopKGate(
            hidden_size,
            num_experts,
            k,
            capacity_factor,
            eval_capacity_factor,
            min_capacity,
            noisy_gate_policy,
            drop_tokens,
            use_rts,
            None,
            top2_2nd_expert_sampling,
        )
        experts = ep.Experts(expert, self.num_local_experts, self.expert_group_name)
        self.deepspeed_moe = ep.MOELayer(
            gate, experts, self.expert_group_name, ep_size, self.num_local_experts
        )
        if use_residual:
            self.mlp = expert
            self.coefficient = nn.Linear(hidden_size, 2)
        self.groups: ep.ExpertGroups | None = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.set_deepspeed_parallelism()

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Create (once per ``ep_size``, collectively) and attach this layer's expert groups."""
        if use_data_before_expert_parallel_:
            raise NotImplementedError("MoE: use_data_before_expert_parallel_ is not supported")
        self.groups = ep.expert_groups(self.ep_size)
        self.deepspeed_moe._set_ep_group(self.groups.ep_group)
        self.deepspeed_moe.experts.first_local = self.first_expert

    @property
    def first_expert(self) -> int:
        """Global index of this rank's first local expert."""
        rank = self.groups.ep_rank if self.groups is not None else 0
        return rank * self.num_local_experts

    def forward(
        self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, l_aux, exp_counts)``: output of ``hidden_states``' shape, the load-balancing loss and
        the tokens each expert was chosen by (before capacity drops)."""
        if self.groups is None:
            self.set_deepspeed_parallelism()
        output = self.deepspeed_moe(hidden_states, used_token)
        if self.use_residual:
            dense = self.mlp(hidden_states)
            if isinstance(dense, tuple):
                dense = dense[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + dense * coef[..., 1:]
        return output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts
