"""sparse_gradients (core/sparse_gradients.py, parallel/sparse_rows.py): sparse embedding gradients
reduced as rows at stage 0 give the dense result; every other case trains dense."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import zerostep
import zerostep.core as zc
from zerostep.core.config import Config
from zerostep.core.sparse_gradients import SparseReducer
from zerostep.parallel.launch import spawn_ranks

VOCAB, DIM = 64, 8


class EmbNet(nn.Module):
    """A sparse-able table, an EmbeddingBag and a dense head."""

    def __init__(self, sparse: bool = True, bag: bool = True, tied: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, DIM, sparse=sparse)
        self.bag = nn.EmbeddingBag(VOCAB, DIM, mode="mean", sparse=sparse) if bag else None
        self.head = nn.Linear(DIM, 1)
        if tied:
            self.out = nn.Linear(DIM, VOCAB, bias=False)
            self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x).mean(1)  # [B, T, D] -> [B, D]
        if self.bag is not None:
            h = h + self.bag(x)  # [B, D]
        if hasattr(self, "out"):
            h = h + self.out(h).mean(1, keepdim=True)
        return self.head(h)


def mse(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def _config(sparse: bool, stage: int = 0, gas: int = 2, world: int = 1) -> dict:
    return {
        "train_batch_size": 4 * world,
        "gradient_accumulation_steps": gas,
        "sparse_gradients": sparse,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
    }


def _batches(seed: int, n: int = 3, rows: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # indices from a part of the vocabulary only: most rows of the table get no gradient
    return [
        (torch.randint(0, VOCAB // 4, (rows, 5), generator=g), torch.randn(rows, 1, generator=g))
        for _ in range(n)
    ]


def _train(model: nn.Module, config: dict, batches: list, compile: bool = False) -> tuple[dict, object]:
    engine = zc.initialize(model, config, loss_fn=mse, compile=compile)
    state = engine.init()
    for batch in batches:
        state = engine.step(state, batch)
    return engine.full_params(state), engine


def _close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tol, rtol=0, msg=name)


def test_sparse_equals_dense_one_process():
    batches = _batches(1)
    dense, _ = _train(EmbNet(sparse=False), _config(False), batches)
    sparse, engine = _train(EmbNet(sparse=True), _config(True), batches)
    assert isinstance(engine._reducer, SparseReducer)
    assert [t.name for t in engine._sparse.tables] == ["emb.weight", "bag.weight"]
    _close(sparse, dense)


@pytest.mark.skipif(
    os.environ.get("ZEROSTEP_SLOW_TESTS") != "1", reason="torch.compile with graph breaks: ~30 s"
)
def test_sparse_equals_dense_compiled():
    batches = _batches(1)
    dense, _ = _train(EmbNet(sparse=False), _config(False), batches)
    compiled, engine = _train(EmbNet(sparse=True), _config(True), batches, compile=True)
    assert engine._sparse is not None  # the lookups run eagerly between the compiled graphs
    _close(compiled, dense)


def test_without_the_key_sparse_embeddings_train_dense():
    batches = _batches(2)
    dense, _ = _train(EmbNet(sparse=False), _config(False), batches)
    model = EmbNet(sparse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the values are the same
        params, engine = _train(model, _config(False), batches)
    assert engine._sparse is None and not model.emb.sparse and not model.bag.sparse
    _close(params, dense)


def test_other_stages_warn_and_train_dense():
    batches = _batches(3, n=2)
    dense, _ = _train(EmbNet(sparse=False), _config(False, stage=1), batches)
    with pytest.warns(UserWarning, match="sparse_gradients has no effect at ZeRO stage 1"):
        params, engine = _train(EmbNet(sparse=True), _config(True, stage=1), batches)
    assert engine._sparse is None
    _close(params, dense)


def test_no_sparse_table_and_tied_table_warn():
    with pytest.warns(
        UserWarning, match="no trainable nn.Embedding or nn.EmbeddingBag built with sparse=True"
    ):
        engine = zc.initialize(EmbNet(sparse=False), _config(True), loss_fn=mse, compile=False)
    assert engine._sparse is None
    batches = _batches(4, n=2)
    dense, _ = _train(EmbNet(sparse=False, tied=True), _config(False), batches)
    with pytest.warns(UserWarning, match="emb.weight is tied to another parameter"):
        params, engine = _train(EmbNet(sparse=True, tied=True), _config(True), batches)
    assert [t.name for t in engine._sparse.tables] == ["bag.weight"]
    _close(params, dense)


def test_config_key_checked():
    assert Config.from_dict({"train_batch_size": 1, "sparse_gradients": True}).sparse_gradients is True
    with pytest.raises(zc.ConfigError, match='sparse_gradients = "yes": must be true or false'):
        Config.from_dict({"train_batch_size": 1, "sparse_gradients": "yes"})


def test_module_called_outside_the_engine_keeps_its_sparse_gradient():
    model = EmbNet(sparse=True, bag=False)
    zc.initialize(model, _config(True), loss_fn=mse, compile=False).init()
    loss = mse(model, _batches(5, n=1)[0])
    loss.backward()
    assert model.emb.weight.grad is not None and model.emb.weight.grad.is_sparse


def test_facade_equals_core():
    batches = _batches(6, n=2)
    core, _ = _train(EmbNet(sparse=True), _config(True), batches)
    engine, *_ = zerostep.initialize(model=EmbNet(sparse=True), config=_config(True), compile=False)
    for x, y in batches:
        for i in range(2):  # micro-batches of 2
            loss = F.mse_loss(engine(x[2 * i : 2 * i + 2]), y[2 * i : 2 * i + 2])
            engine.backward(loss)
            engine.step()
    _close(engine._core.full_params(engine.state), core)


_ONE_TABLE: list = []


def _one_table_engine():
    """One engine for every hypothesis example (building one per example costs more than the check)."""
    if not _ONE_TABLE:
        model = nn.Embedding(10, 3, sparse=True)
        config = {"train_batch_size": 1, "sparse_gradients": True, "optimizer": {"type": "SGD"}}
        engine = zc.initialize(nn.Sequential(model), config, loss_fn=lambda m, b: m(b).sum(), compile=False)
        _ONE_TABLE.extend([model, engine])
    return _ONE_TABLE


@given(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=6), min_size=1, max_size=3))
def test_rows_summed_over_micro_batches_equal_the_dense_gradient(lookups):
    """Whatever rows repeat within and across micro-batches, the reducer's slot is the dense gradient."""
    model, engine = _one_table_engine()
    reducer, table = engine._reducer, engine._sparse.tables[0]
    weight = torch.randn(10, 3)
    dense = torch.zeros(10, 3)
    reducer.reset()
    for i, rows in enumerate(lookups):
        leaf = weight.clone().requires_grad_(True)
        ids = torch.tensor(rows)
        out = torch.func.functional_call(model, {"weight": leaf}, (ids,))
        (out * torch.arange(1.0, 4.0)).sum().backward()
        assert leaf.grad is None  # the tap kept the table's gradient out of the flat buffer
        dense += F.one_hot(ids, 10).float().sum(0)[:, None] * torch.arange(1.0, 4.0)
        grads = {table.group: [torch.zeros(10, 3)]}
        reducer.add(grads, last=i == len(lookups) - 1)
    torch.testing.assert_close(reducer.result()[table.group][table.index], dense)


# ------------------------------------------------------------------ two ranks, one spawn


def _two_ranks(rank: int, world: int) -> dict:
    batches = _batches(10 + rank, n=3, rows=4)  # different rows, and row counts, on each rank
    out = {}
    for sparse in (False, True):
        params, engine = _train(EmbNet(sparse=sparse), _config(sparse, world=world), batches)
        out[sparse] = (params, engine.comm.total_bytes, engine.comm.steps)
    return out


def test_two_ranks_sparse_equals_dense_with_fewer_bytes():
    for report in spawn_ranks(_two_ranks, 2, timeout=120):
        (dense, dense_bytes, steps), (sparse, sparse_bytes, sparse_steps) = report[False], report[True]
        _close(sparse, dense)
        assert steps == sparse_steps == 3
        # 2 tables of 64 x 8 all-reduced (2 x 2 x 2 KiB per step) against at most 2 x 20 gathered rows each
        assert sparse_bytes < 0.7 * dense_bytes, (sparse_bytes, dense_bytes)
