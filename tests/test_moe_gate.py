"""The MoE gate and layer in one process: routes against a reference gate written here from the equations
(capacity, dropping, slots, weights, aux loss), the layer against a per-token sum over experts, DeepSpeed's
parameter split, bad input, and (where /work/dsvenv's DeepSpeed runs) DeepSpeed's own TopKGate."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from zerostep.moe.layer import MoE
from zerostep.moe.utils import (
    has_moe_layers,
    is_moe_param,
    split_params_into_different_moe_groups_for_optimizer,
)
from zerostep.parallel import moe_gate
from zerostep.parallel.moe_gate import TopKGate

DS_PYTHON = Path("/work/dsvenv/bin/python")


def reference_routes(logits, k, cf, min_cap, drop, scores=None):
    """Per token and route: (expert or -1, slot, weight), the capacity and l_aux, from the equations."""
    s, e = logits.shape
    g = torch.softmax(logits.double(), dim=1).tolist()
    order = [sorted(range(e), key=lambda j: -row[j])[:k] for row in g]  # each token's top-k experts
    if k <= 2:
        # top-1 / top-2: every first choice of an expert queues before every second choice
        queue = {j: [] for j in range(e)}
        for r in range(k):
            for t in range(s):
                queue[order[t][r]].append((t, r))
        counts = [len(queue[j]) for j in range(e)]
        if k == 1:
            cap = max(math.ceil(s / e * cf), min_cap) if drop else min(max(counts), s)
        else:
            cap = max(math.ceil(s / e * cf * 2), min_cap) if drop else max(counts)
        kept = {}
        for j in range(e):
            entries = queue[j]
            if k == 1:  # random token selection: the cap highest scores stay, in token order
                entries = sorted(sorted(entries, key=lambda tr: -scores[tr[0]][j])[:cap])
            for slot, (t, r) in enumerate(entries):
                if slot < cap:
                    kept[(t, r)] = (j, slot)
        ce = [sum(1 for t in range(s) if order[t][0] == j) / s for j in range(e)]
    else:
        counts = [sum(1 for t in range(s) if j in order[t]) for j in range(e)]
        cap = max(math.ceil(s / e * cf * k), min_cap) if drop else max(counts)
        kept = {}
        for j in range(e):
            chose = [t for t in range(s) if j in order[t]]
            stay = sorted(sorted(chose, key=lambda t: -g[t][j])[:cap]) if drop else chose
            for slot, t in enumerate(stay):
                kept[(t, order[t].index(j))] = (j, slot)
        ce = [counts[j] / s for j in range(e)]
    me = [sum(g[t][j] for t in range(s)) / s for j in range(e)]
    l_aux = sum(a * b for a, b in zip(me, ce)) * e / (1 if k <= 2 else k)
    routes = []
    for t in range(s):
        row = []
        total = sum(g[t][order[t][r]] for r in range(k) if (t, r) in kept)
        for r in range(k):
            if (t, r) in kept:
                j, slot = kept[(t, r)]
                w = g[t][j] if k == 1 else g[t][j] / max(total, 1.2e-7)
                row.append((j, slot, w))
            else:
                row.append((-1, 0, 0.0))
        routes.append(row)
    return routes, cap, l_aux, counts


def assert_matches(r, ref, cap, l_aux, counts, check_slots=True):
    assert r.capacity == cap
    assert r.exp_counts.tolist() == counts
    assert abs(r.l_aux.item() - l_aux) < 1e-5
    k, s = r.indices.shape
    for t in range(s):
        for j in range(k):
            want = ref[t][j]
            assert r.indices[j, t].item() == want[0], (t, j)
            if check_slots:
                assert r.locations[j, t].item() == want[1], (t, j)
            assert abs(r.gates[j, t].item() - want[2]) < 1e-5, (t, j)


@settings(max_examples=60, deadline=None)
@given(
    e=st.integers(1, 8),
    k=st.integers(1, 3),
    cf=st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0]),
    s=st.integers(1, 24),
    min_cap=st.integers(0, 4),
    drop=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_routes_match_the_equations(e, k, cf, s, min_cap, drop, seed):
    k = min(k, e)
    torch.manual_seed(seed)
    logits = torch.randn(s, e)
    if k == 1:
        if s < min_cap:
            with pytest.raises(ValueError, match="min_capacity"):
                moe_gate.top1_routes(logits, cf, min_cap, drop_tokens=drop)
            return
        state = torch.get_rng_state()
        r = moe_gate.top1_routes(logits, cf, min_cap, drop_tokens=drop, use_rts=True)
        torch.set_rng_state(state)
        scores = torch.rand(s, e).tolist()  # the uniform draw random token selection made
        ref, cap, l_aux, counts = reference_routes(logits, 1, cf, min_cap, drop, scores)
        assert_matches(r, ref, cap, l_aux, counts)
        # without RTS: which tied tokens stay is torch.topk's choice, but how many and their slots are not
        r = moe_gate.top1_routes(logits, cf, min_cap, drop_tokens=drop, use_rts=False)
        kept = r.indices[0] >= 0
        assert kept.sum().item() == sum(min(c, cap) for c in counts)
        for j in range(e):
            slots = r.locations[0][kept & (r.indices[0] == j)]
            assert slots.tolist() == list(range(len(slots)))
        return
    if k == 2:
        r = moe_gate.top2_routes(logits, cf, min_cap, drop_tokens=drop, top2_2nd_expert_sampling=False)
    else:
        r = moe_gate.topk_routes(logits, k, cf, min_cap, drop_tokens=drop)
    ref, cap, l_aux, counts = reference_routes(logits, k, cf, min_cap, drop)
    assert_matches(r, ref, cap, l_aux, counts)
    # the dense form (DeepSpeed's combine_weights) holds the same routes
    combine, dispatch = moe_gate.dense_combine(r)
    assert combine.shape == (s, e, r.capacity)
    assert torch.allclose(combine.sum(dim=(1, 2)), r.gates.sum(0), atol=1e-6)
    assert dispatch.sum().item() == (r.indices >= 0).sum().item()


def test_aux_loss_is_its_formula_and_has_a_gradient():
    torch.manual_seed(0)
    w = torch.randn(16, 4, requires_grad=True)
    for k in (1, 2):
        r = moe_gate.top2_routes(w, 1.0, 0, top2_2nd_expert_sampling=False) if k == 2 else None
        r = r or moe_gate.top1_routes(w, 1.0, 0)
        g = torch.softmax(w, 1)
        first = torch.nn.functional.one_hot(g.argmax(1), 4).float()
        assert torch.allclose(r.l_aux, (g.mean(0) * first.mean(0)).sum() * 4)
        (grad,) = torch.autograd.grad(r.l_aux, w)
        assert grad.abs().sum() > 0
    # perfectly balanced routing with uniform gates gives l_aux = 1
    r = moe_gate.top1_routes(torch.zeros(8, 4) + torch.eye(4).repeat(2, 1) * 1e-3, 1.0, 0)
    assert abs(r.l_aux.item() - 1.0) < 1e-2


class Lin(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.fc = nn.Linear(m, m)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def per_token_reference(layer: MoE, x: torch.Tensor, routes) -> torch.Tensor:
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    tokens = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(routes.indices.shape[0]):
            e = routes.indices[j, t].item()
            if e >= 0:
                out[t] += routes.gates[j, t] * experts[e](tokens[t])
    return out.reshape(x.shape)


@pytest.mark.parametrize("k,drop,residual", [(1, True, False), (2, False, True), (3, True, False)])
def test_layer_is_the_weighted_sum_of_its_experts(k, drop, residual):
    torch.manual_seed(1)
    layer = MoE(
        6,
        Lin(6),
        num_experts=4,
        k=k,
        capacity_factor=0.5,
        min_capacity=1,
        use_residual=residual,
        drop_tokens=drop,
    )
    layer.deepspeed_moe.gate.top2_2nd_expert_sampling = False
    for i, e in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
        nn.init.normal_(e.fc.weight, std=0.5 + i)  # distinct experts
    x = torch.randn(2, 5, 6)
    state = torch.get_rng_state()
    out, l_aux, counts = layer(x)
    torch.set_rng_state(state)
    routes = layer.deepspeed_moe.gate.routes(x.reshape(-1, 6))
    want = per_token_reference(layer, x, routes)
    if residual:
        coef = torch.softmax(layer.coefficient(x), -1)
        want = want * coef[..., :1] + layer.mlp(x) * coef[..., 1:]
    assert out.shape == x.shape
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.equal(l_aux, routes.l_aux) and torch.equal(counts, routes.exp_counts)
    if drop:
        assert (routes.indices < 0).any()  # capacity 0.5 drops some routes
    out.sum().backward()
    assert layer.deepspeed_moe.gate.wg.weight.grad.abs().sum() > 0


def test_noise_policies_and_eval_capacity():
    torch.manual_seed(2)
    gate = TopKGate(
        4,
        4,
        k=1,
        capacity_factor=1.0,
        eval_capacity_factor=2.0,
        min_capacity=0,
        noisy_gate_policy="Jitter",
        use_rts=False,
    )
    x = torch.randn(16, 4)
    a, b = gate.routes(x), gate.routes(x)
    assert not torch.equal(a.gates, b.gates)  # jitter in training
    gate.eval()
    a, b = gate.routes(x), gate.routes(x)
    assert torch.equal(a.gates, b.gates) and a.capacity == 8  # no jitter, eval factor
    gate = TopKGate(4, 4, k=1, min_capacity=0, noisy_gate_policy="RSample", use_rts=False)
    picks = {tuple(gate.routes(x).indices[0].tolist()) for _ in range(5)}
    assert len(picks) > 1  # Gumbel noise changes the argmax


def test_parameter_split_and_marks():
    model = nn.Sequential(nn.Linear(4, 4), MoE(4, nn.Linear(4, 4), num_experts=2))
    assert has_moe_layers(model) == (True, 2)
    expert = [n for n, p in model.named_parameters() if is_moe_param(p)]
    assert expert == [
        f"1.deepspeed_moe.experts.deepspeed_experts.{i}.{w}" for i in (0, 1) for w in ("weight", "bias")
    ]
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "dense", "lr": 0.1}, max_group_size=4
    )
    assert [len(g["params"]) for g in groups] == [3, 1, 1, 1, 1]  # 4x4 weights are cut one per group
    assert [g.get("moe", False) for g in groups] == [False, True, True, True, True]
    assert all(g["name"] == "ep_size_1" and g["lr"] == 0.1 for g in groups[1:])


def test_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        MoE(4, lambda x: x, num_experts=2)
    with pytest.raises(ValueError, match="not divisible by ep_size"):
        MoE(4, nn.Linear(4, 4), num_experts=3, ep_size=2)
    with pytest.raises(ValueError, match="larger than num_experts"):
        MoE(4, nn.Linear(4, 4), num_experts=2, k=3)
    with pytest.raises(ValueError, match="noisy_gate_policy"):
        MoE(4, nn.Linear(4, 4), num_experts=2, noisy_gate_policy="Gaussian")
    layer = MoE(4, nn.Linear(4, 4), num_experts=2, ep_size=2)
    with pytest.raises(ValueError, match="ep_size=2 is larger than the world size 1"):
        layer(torch.randn(8, 4))


_DS_SCRIPT = r"""
import json, sys, torch
from deepspeed.moe.sharded_moe import TopKGate
out = []
for case in json.loads(sys.argv[1]):
    torch.manual_seed(case["seed"])
    g = TopKGate(case["m"], case["e"], k=case["k"], capacity_factor=case["cf"], min_capacity=case["min"],
                 drop_tokens=case["drop"], use_rts=case["rts"], top2_2nd_expert_sampling=False)
    g.wg.weight.data = torch.tensor(case["w"])
    x = torch.tensor(case["x"])
    torch.manual_seed(case["seed"])
    l_aux, combine, _, counts = g(x)
    out.append([l_aux.item(), combine.tolist(), counts.tolist()])
print(json.dumps(out))
"""


@pytest.mark.skipif(not DS_PYTHON.exists(), reason="DeepSpeed's venv (/work/dsvenv) is absent")
def test_gate_equals_deepspeeds_topkgate():
    cases = []
    for i, (e, k, cf, s, mn, drop, rts) in enumerate(
        [
            (4, 1, 1.0, 16, 4, True, True),
            (4, 1, 0.5, 16, 0, True, False),
            (8, 1, 1.0, 5, 0, False, True),
            (4, 2, 1.0, 16, 4, True, False),
            (8, 2, 0.5, 6, 0, True, False),
            (4, 2, 1.0, 9, 0, False, False),
            (6, 3, 1.0, 12, 2, True, False),
            (6, 4, 1.0, 5, 0, False, False),
        ]
    ):
        torch.manual_seed(100 + i)
        cases.append(
            dict(
                seed=i,
                m=5,
                e=e,
                k=k,
                cf=cf,
                min=mn,
                drop=drop,
                rts=rts,
                w=torch.randn(e, 5).tolist(),
                x=torch.randn(s, 5).tolist(),
            )
        )
    env = {**os.environ, "PYTHONPATH": ""}
    run = subprocess.run(
        [str(DS_PYTHON), "-c", _DS_SCRIPT, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    if run.returncode != 0 and "No module named 'deepspeed'" in run.stderr:
        pytest.skip("DeepSpeed is not importable in /work/dsvenv")
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    for case, (l_aux, combine, counts) in zip(cases, theirs, strict=True):
        g = TopKGate(
            case["m"],
            case["e"],
            k=case["k"],
            capacity_factor=case["cf"],
            min_capacity=case["min"],
            drop_tokens=case["drop"],
            use_rts=case["rts"],
            top2_2nd_expert_sampling=False,
        )
        g.wg.weight.data = torch.tensor(case["w"])
        torch.manual_seed(case["seed"])
        mine, mine_combine, _, mine_counts = g(torch.tensor(case["x"]))
        assert abs(mine.item() - l_aux) < 1e-6, case
        assert mine_counts.tolist() == counts, case
        assert torch.allclose(mine_combine, torch.tensor(combine), atol=1e-6), case


def test_moe_config_block_warns_it_has_no_effect_on_training():
    from zerostep.core import Config
    from zerostep.core.config.values import ConfigWarning

    with pytest.warns(ConfigWarning, match="moe = .*inference engine"):
        Config.from_dict({"train_micro_batch_size_per_gpu": 1, "moe": {"num_experts": 8}})
