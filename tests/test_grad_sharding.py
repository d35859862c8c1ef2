"""ShardedBackward: each unit's gradient reduce-scattered inside backward equals reduce-scattering the
full gradient afterwards, on real gloo ranks, synchronously and overlapped (gloo's async collectives)."""

from __future__ import annotations

import torch
from torch import nn

from zerostep.parallel import collectives
from zerostep.parallel.flat import FlatLayout
from zerostep.parallel.grad_sharding import GradShardSink, ShardedBackward
from zerostep.parallel.launch import spawn_ranks


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))
        self.unused = nn.Linear(6, 6)

    def forward(self, x, params):
        for i in range(4):
            w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
            x = torch.tanh(x @ w.t() + b)
        return x.pow(2).sum()


def sharded_equals_full(rank: int, world_size: int):
    model = Chain()
    units = [f"layers.{i}" for i in range(4)] + ["unused"]
    layouts = {
        u: FlatLayout.build(
            [(f"{u}.{k}", tuple(p.shape)) for k, p in model.get_submodule(u).named_parameters()],
            torch.float32,
            world_size,
        )
        for u in units
    }
    named = dict(model.named_parameters())
    flats = {u: lay.flatten({n: named[n].detach() for n in lay.names}) for u, lay in layouts.items()}
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(rank))

    def loss_of(leaves):
        params = {n: t for u, lay in layouts.items() for n, t in zip(lay.names, leaves[u])}
        return model(x, params)

    # reference: full flat gradients, then reduce-scattered (unused unit: zeros)
    full = {u: f.clone().requires_grad_(True) for u, f in flats.items()}
    grads = torch.autograd.grad(
        loss_of({u: layouts[u].split(f) for u, f in full.items()}), list(full.values()), allow_unused=True
    )
    want = {
        u: collectives.reduce_scatter_flat((torch.zeros_like(f) if g is None else g) * 0.5, None)
        for (u, f), g in zip(full.items(), grads)
    }
    out = {}
    for overlap in (False, True):
        sink = GradShardSink(None, predivide=0.5, overlap=overlap, max_in_flight=1)
        got, order = {}, []
        pending_most = [0]

        def deliver(u, shard, got=got, order=order, sink=sink, pending_most=pending_most):
            got[u] = shard.clone()
            order.append(u)
            pending_most[0] = max(pending_most[0], len(sink.pending))

        backward = ShardedBackward(layouts, flats, sink, deliver)
        backward.run(loss_of(backward.leaves))
        assert not sink.pending and not backward.buffers
        assert all(leaf.grad is None for leaves in backward.leaves.values() for leaf in leaves)
        out[overlap] = (got, order, pending_most[0])
    return want, out


def test_sharded_backward_equals_reduce_scatter_of_the_full_gradient():
    for want, out in spawn_ranks(sharded_equals_full, 2, timeout=120):
        for overlap, (got, order, pending_most) in out.items():
            assert set(got) == set(want)
            for u in want:
                torch.testing.assert_close(got[u], want[u], rtol=1e-6, atol=1e-7)
            # backward order: the last layer's unit is complete first; the unused unit comes last
            assert order == ["layers.3", "layers.2", "layers.1", "layers.0", "unused"], order
            assert pending_most <= 1  # max_in_flight bounds the full buffers kept alive
            assert overlap or pending_most == 0
