"""parallel/tensor_parallel: shard/reassemble round trips (hypothesis), plan checks, the no-op at one rank.
The 2-rank forward/backward equality of sharded models is in tests/test_autotp.py (one spawn for both);
the collectives' autograd under torch.compile runs with ZEROSTEP_SLOW_TESTS=1."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from zerostep.parallel.launch import spawn_ranks
from zerostep.parallel.tensor_parallel import (
    ShardSpec,
    TPPlan,
    TPPlanError,
    full_from_shards,
    plan_specs,
    shard_module,
    shard_of_full,
)


@st.composite
def split_tensors(draw):
    """A tensor, a split dim, a TP size and fused part sizes that it divides."""
    tp = draw(st.sampled_from([1, 2, 3, 4]))
    n_parts = draw(st.integers(1, 3))
    parts = tuple(tp * draw(st.integers(1, 3)) for _ in range(n_parts))
    ndim = draw(st.integers(1, 3))
    dim = draw(st.integers(0, ndim - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[dim] = sum(parts)
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    return full, ShardSpec(dim, tp, parts if n_parts > 1 else ())


@settings(max_examples=60, deadline=None)
@given(split_tensors(), st.sampled_from([1, 2, 3, 4, 6]))
def test_shards_round_trip_and_reshard_to_any_size(case, other_tp):
    full, spec = case
    shards = [shard_of_full(full, spec, r) for r in range(spec.tp_size)]
    assert all(s.shape == shards[0].shape for s in shards)
    assert torch.equal(full_from_shards(shards, spec), full)
    # every element in exactly one shard
    assert sorted(torch.cat([s.flatten() for s in shards]).tolist()) == full.flatten().tolist()
    parts = spec.fused or (full.shape[spec.dim],)
    if all(p % other_tp == 0 for p in parts):  # a checkpoint saved at tp_size, loaded at other_tp
        again = spec.at(other_tp)
        resharded = [shard_of_full(full_from_shards(shards, spec), again, r) for r in range(other_tp)]
        assert torch.equal(full_from_shards(resharded, again), full)


def test_fused_qkv_shard_holds_its_own_heads_q_k_and_v():
    qkv = torch.arange(12.0)[:, None]  # rows q = 0..3, k = 4..7, v = 8..11
    spec = ShardSpec(0, 2, (4, 4, 4))
    assert shard_of_full(qkv, spec, 0).flatten().tolist() == [0, 1, 4, 5, 8, 9]
    assert shard_of_full(qkv, spec, 1).flatten().tolist() == [2, 3, 6, 7, 10, 11]
    assert not ShardSpec(None, 1).sharded and shard_of_full(qkv, ShardSpec(None, 1), 0) is qkv
    with pytest.raises(TPPlanError, match="tp_size=3 does not divide a part of size 4"):
        shard_of_full(qkv, ShardSpec(0, 3, (4, 4, 4)), 0)
    with pytest.raises(TPPlanError, match="do not add up to 12"):
        shard_of_full(qkv, ShardSpec(0, 2, (4, 4)), 0)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.emb.weight
        self.heads = 2

    def forward(self, ids):
        return self.head(self.down(torch.relu(self.up(self.emb(ids)))))


def test_plan_specs_every_name_and_checks():
    plan = TPPlan(
        {"emb": "vocab", "up": "colwise", "down": "rowwise", "head": "colwise_gather"},
        fixups={"": ("heads",)},
    )
    specs = plan_specs(Tiny(), plan, 2)
    assert specs == {
        "emb.weight": ShardSpec(0, 2),
        "head.weight": ShardSpec(0, 2),  # the tied alias, split the same way
        "up.weight": ShardSpec(0, 2),
        "up.bias": ShardSpec(0, 2),
        "down.weight": ShardSpec(1, 2),
        "down.bias": ShardSpec(None, 1),  # row bias replicated, added after the reduce
    }
    with pytest.raises(TPPlanError, match="tied parameter split inconsistently: emb.weight.*head.weight"):
        plan_specs(Tiny(), TPPlan({"emb": "vocab", "up": "colwise", "down": "rowwise"}), 2)
    with pytest.raises(TPPlanError, match=r"up.weight \[6, 4\], dim 0: tp_size=4 does not divide"):
        plan_specs(Tiny(), TPPlan({"up": "colwise"}), 4)
    with pytest.raises(TPPlanError, match="tp_size=3 does not divide heads=2"):
        plan_specs(Tiny(), TPPlan({}, fixups={"": ("heads",)}), 3)
    with pytest.raises(TPPlanError, match="style 'vocab' needs an nn.Embedding, got Linear"):
        plan_specs(Tiny(), TPPlan({"up": "vocab"}), 2)
    with pytest.raises(TPPlanError, match=r"no module\(s\) \['nope'\] in Tiny"):
        plan_specs(Tiny(), TPPlan({"nope": "colwise"}), 2)
    with pytest.raises(TPPlanError, match=r"grad_reduce paths \['up'\] are also sharded layers"):
        TPPlan({"up": "colwise"}, grad_reduce=frozenset({"up"}))
    with pytest.raises(TPPlanError, match=r"no module\(s\) \['gone'\]"):
        plan_specs(Tiny(), TPPlan({}, grad_reduce=frozenset({"gone"})), 2)
    with pytest.raises(TPPlanError, match="unknown style"):
        TPPlan({"up": "diagonal"})
    with pytest.raises(TPPlanError, match=r"transposed paths \['down'\] are not in layers"):
        TPPlan({"up": "colwise"}, transposed=frozenset({"down"}))


def test_one_rank_is_a_no_op():
    model = Tiny()
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    specs = shard_module(model, TPPlan({"up": "colwise", "down": "rowwise"}), None)
    assert set(specs) == set(before) and not any(s.sharded for s in specs.values())
    assert all(p is before[n] for n, p in model.named_parameters(remove_duplicate=False))
    assert type(model.up) is nn.Linear and model.heads == 2


def compiled_rank(rank: int, world_size: int) -> dict:
    """The three collectives' gradients eagerly and under torch.compile(fullgraph=True)."""
    import torch.distributed as dist

    from zerostep.parallel.tensor_parallel import copy_to_tp, gather_from_tp, reduce_from_tp

    group = dist.group.WORLD
    x = torch.full((3,), float(rank + 1), requires_grad=True)

    def f(x):  # y = sum_r (r + 1) x_r, replicated; gathered [y, y]; one loss on every rank
        y = reduce_from_tp(copy_to_tp(x, group) * (rank + 1), group)
        return (gather_from_tp(y, group) * torch.arange(6.0)).sum()

    f(x).backward()
    eager, x.grad = x.grad.clone(), None
    torch.compile(f, fullgraph=True)(x).backward()
    out = {"eager": eager.tolist(), "compiled": x.grad.tolist()}

    # a grad_reduce module (per-head norm): its weight's gradient summed over the ranks
    norm = nn.LayerNorm(3)
    shard_module(norm, TPPlan({}, grad_reduce=frozenset({""})), group)

    def g(x):
        return (norm(x.detach() * (rank + 1) + torch.arange(3.0)) * torch.arange(3.0)).sum()

    g(x).backward()
    eager_w, norm.weight.grad = norm.weight.grad.clone(), None
    torch.compile(g)(x).backward()  # the norm's forward is a graph break
    local = nn.LayerNorm(3)  # this rank's own partial gradient
    g_local = (local(x.detach() * (rank + 1) + torch.arange(3.0)) * torch.arange(3.0)).sum()
    g_local.backward()
    total = local.weight.grad.clone()
    dist.all_reduce(total, group=group)
    out["norm"] = [torch.allclose(eager_w, total), torch.allclose(norm.weight.grad, total)]
    return out


@pytest.mark.skipif(
    os.environ.get("ZEROSTEP_SLOW_TESTS") != "1", reason="compiles: ~10 s; ZEROSTEP_SLOW_TESTS=1"
)
def test_collectives_autograd_eager_and_compiled():
    # dL/dy = arange(6) on both ranks; rank r keeps slice r of the gathered gradient, scaled by (r + 1)
    # (rank 0: [0, 1, 2], rank 1: [6, 8, 10]), and copy_to_tp's backward sums them: [6, 9, 12]
    for out in spawn_ranks(compiled_rank, 2, timeout=240):
        assert out == {"eager": [6.0, 9.0, 12.0], "compiled": [6.0, 9.0, 12.0], "norm": [True, True]}
