"""Expert parallelism: ``check_ranks`` (run on 2 gloo ranks by tests/test_moe_engine.py, in the one spawn
of the MoE tests) checks that the MoE layer at ep_size 1 and 2 gives the outputs, aux losses and (once
reduced as the engine reduces them) gradients of one process holding every expert; here, DeepSpeed's group
layout and bad ep_size."""

import pytest
import torch
from torch import nn

from zerostep.parallel.expert import expert_rank_layout, global_expert_name

M, E, TOKENS = 6, 4, 10  # tokens per rank


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(M, 8), nn.Linear(8, M)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def build(ep_size: int, case: dict):
    from zerostep.moe.layer import MoE

    torch.manual_seed(0)
    layer = MoE(
        M, Mlp(), num_experts=E, ep_size=ep_size, min_capacity=0, top2_2nd_expert_sampling=False, **case
    )
    return layer


def reference_layer(case: dict):
    layer = build(1, case)
    torch.manual_seed(1)
    for e in layer.deepspeed_moe.experts.deepspeed_experts:  # distinct experts
        for p in e.parameters():
            p.data.normal_()
    return layer


def grads_of(layer):
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


def check_ranks(rank: int, world: int) -> list:
    import torch.distributed as dist

    from zerostep.moe.utils import is_moe_param

    torch.manual_seed(5)
    x = torch.randn(world, TOKENS, M)
    w = torch.randn(world, TOKENS, M)
    failures = []
    cases = [dict(k=2, drop_tokens=False), dict(k=1, drop_tokens=True, capacity_factor=0.75, use_rts=False)]
    for case in cases:
        # one process holding every expert, run on each rank's tokens in turn (the gate sees a rank's tokens)
        ref = reference_layer(case)
        ref_outs, ref_aux = [], []
        for r in range(world):
            out, l_aux, _ = ref(x[r])
            (out * w[r]).sum().backward()
            ref_outs.append(out.detach())
            ref_aux.append(l_aux.detach())
        ref_grads = grads_of(ref)
        for ep_size in (1, 2):
            layer = build(ep_size, case)
            first = layer.first_expert
            # this rank's experts only: local expert i is the reference's global expert first + i
            full = ref.state_dict()
            layer.load_state_dict({n: full[global_expert_name(n, first)] for n in layer.state_dict()})
            out, l_aux, counts = layer(x[rank])
            (out * w[rank]).sum().backward()
            if len(layer.deepspeed_moe.experts.deepspeed_experts) != E // ep_size:
                failures.append((ep_size, "holds other ranks' experts"))
            for p in layer.parameters():
                # dense gradients summed over the world, an expert's over the ranks holding it (its edp group)
                dist.all_reduce(p.grad, group=layer.groups.edp_group if is_moe_param(p) else None)
            tag = (case["k"], ep_size)
            if not torch.allclose(out, ref_outs[rank], rtol=1e-6, atol=1e-6):
                failures.append((tag, "out", (out - ref_outs[rank]).abs().max().item()))
            if not torch.allclose(l_aux, ref_aux[rank], atol=1e-6):
                failures.append((tag, "l_aux"))
            for name, p in layer.named_parameters():
                want = ref_grads[global_expert_name(name, first)]
                if not torch.allclose(p.grad, want, rtol=1e-6, atol=1e-6):
                    failures.append((tag, name, (p.grad - want).abs().max().item()))
            if ep_size == 2 and case["k"] == 2:
                failures += (
                    [] if layer.deepspeed_moe.last_all_to_all_bytes > 0 else [(tag, "no bytes counted")]
                )
    groups = build(2, cases[0]).groups
    return [failures, groups.ep_ranks, groups.edp_ranks, groups.ep_rank]


def test_group_layout_is_deepspeeds():
    ep, edp = expert_rank_layout(8, 2)
    assert ep == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert edp == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert expert_rank_layout(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    with pytest.raises(ValueError, match="larger than the world size"):
        expert_rank_layout(2, 4)
    with pytest.raises(ValueError, match="not divisible by ep_size"):
        expert_rank_layout(6, 4)
