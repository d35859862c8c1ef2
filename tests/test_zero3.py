"""ZeRO-3 gathering: loss and reduce-scattered shard gradients equal one process on the full batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zerostep.parallel.collectives import all_reduce_flat
from zerostep.parallel.launch import spawn_ranks
from zerostep.parallel.zero3 import (
    ROOT_UNIT,
    Zero3Runner,
    gather_params,
    loss_and_grads,
    plan_units,
    shard_params,
    unit_module_paths,
)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.fc(x)) + x


class MLP(nn.Module):
    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        h = self.layers[1](h)  # a block called twice: gathered twice, its gradients add up
        return self.out(h).squeeze(-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x [B, T, D]
        # [B, T, D] -> [B, H, T, D / H]
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # [B, H, T, D / H] -> [B, T, D]


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """GPT-like: tied embedding/head, plus one weight shared by two blocks (both must go to the root)."""

    def __init__(self, vocab: int = 23, dim: int = 16, heads: int = 2, depth: int = 4, seq: int = 8) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.blocks[2].mlp[2].weight = self.blocks[0].mlp[2].weight
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        h = self.wte(idx) + self.wpe(pos)  # [B, T, D]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))  # [B, T, V]


def _mlp_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 5, generator=g), torch.randn(12, generator=g)
    return MLP, (x, y), lambda model, batch: F.mse_loss(model(batch[0]), batch[1])


def _gpt_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 23, (6, 9), generator=g)
    loss = lambda model, batch: F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    return TinyGPT, idx, loss


def _slice(batch, rank: int, world_size: int):
    if isinstance(batch, tuple):
        return tuple(_slice(b, rank, world_size) for b in batch)
    per_rank = batch.shape[0] // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


def _check_equivalence(rank: int, world_size: int) -> dict:
    group = dist.group.WORLD if world_size > 1 else None
    report = {}
    for case in (_mlp_case, _gpt_case):
        model_cls, batch, loss_fn = case(0)
        torch.manual_seed(0)
        model = model_cls()
        reference = {n: p.detach().clone() for n, p in model.named_parameters()}
        full_loss = loss_fn(model, batch)
        full_grads = dict(zip(reference, torch.autograd.grad(full_loss, list(model.parameters()))))

        units = plan_units(model, world_size)
        shards = shard_params(reference, units, rank)
        local = _slice(batch, rank, world_size)
        peaks = {}
        for prefetch in (False, True):  # fully synchronous, then overlapped gathers and reductions
            runner = Zero3Runner(model, units, group, prefetch=prefetch, overlap_reduce=prefetch)
            for call_index in range(2):  # reusable; with prefetch, the second call prefetches
                loss, shard_grads = runner.loss_and_grads(
                    shards, lambda m, b=local, f=loss_fn: f(m, b), scale=4.0
                )
                assert loss.requires_grad is False
                mean_loss = all_reduce_flat(loss.reshape(1), group) / world_size
                torch.testing.assert_close(mean_loss[0], full_loss.detach(), rtol=1e-5, atol=1e-6)
                grads = gather_params(shard_grads, units, group)
                assert set(grads) == set(full_grads)
                for name, grad in grads.items():
                    want = full_grads[name]
                    got = grad / (4.0 * world_size)
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} {prefetch}")
                peaks[(prefetch, call_index)] = runner.peak_gathered_bytes

        # The model is as it was: same Parameter objects and values, no hooks left behind.
        for name, param in model.named_parameters():
            assert type(param) is nn.Parameter and torch.equal(param, reference[name]), name
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        assert torch.equal(
            torch.cat([v.flatten() for v in gather_params(shards, units, group).values()]),
            torch.cat([reference[n].flatten() for n in gather_params(shards, units, group)]),
        )
        by_name = {u.name: u.full_bytes for u in units}
        report[model_cls.__name__] = {
            "peak": peaks[(False, 1)],
            "peak_prefetch": peaks[(True, 1)],
            "world_size": world_size,
            "root": by_name.get(ROOT_UNIT, 0),
            "largest_block": max(v for k, v in by_name.items() if k != ROOT_UNIT),
            "total": sum(by_name.values()),
        }
    return report


def _check_report(report: dict) -> None:
    for model_name, r in report.items():
        # About one block at a time on top of the root unit (two with prefetch); far from the whole model.
        assert r["peak"] <= r["root"] + r["largest_block"], (model_name, r)
        assert r["peak_prefetch"] <= r["root"] + 2 * r["largest_block"], (model_name, r)
        assert r["peak_prefetch"] < 0.6 * r["total"], (model_name, r)
        if r["world_size"] > 1:  # the prefetch really ran (nothing to prefetch at world size 1)
            assert r["peak_prefetch"] > r["peak"], (model_name, r)


def test_plan_units_blocks_root_and_ties():
    model = TinyGPT()
    assert unit_module_paths(model) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    units = {u.name: u for u in plan_units(model, world_size=3)}
    assert list(units) == [ROOT_UNIT, "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    root = set(units[ROOT_UNIT].param_names)
    # The tied embedding/head and the weight shared by blocks 0 and 2 belong to the root unit, once.
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "blocks.0.mlp.2.weight"} <= root
    assert "head.weight" not in root and "blocks.2.mlp.2.weight" not in units["blocks.2"].param_names
    names = [n for u in units.values() for n in u.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(u.layout.world_size == 3 and u.layout.padded_numel % 3 == 0 for u in units.values())
    # A Sequential model: every child is a unit and the root owns nothing.
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert [u.name for u in plan_units(seq)] == ["0", "2"]


def test_world_size_one_in_process():
    report = _check_equivalence(0, 1)
    _check_report(report)


def test_world_size_one_model_on_meta_device():
    """The runner never reads the model's own parameters: they can be dropped to the meta device."""
    model_cls, batch, loss_fn = _mlp_case(1)
    torch.manual_seed(0)
    model = model_cls()
    want_loss = loss_fn(model, batch)
    units = plan_units(model)
    shards = shard_params(dict(model.named_parameters()), units, 0)  # Parameters are fine too
    model.to("meta")
    loss, grads = loss_and_grads(model, shards, lambda m: loss_fn(m, batch), None, 1.0)
    torch.testing.assert_close(loss, want_loss.detach())
    assert all(g.device.type == "cpu" for g in grads.values())


@pytest.mark.parametrize("world_size", [2, 3])
def test_matches_single_process(world_size):
    for report in spawn_ranks(_check_equivalence, world_size, timeout=180):
        _check_report(report)
