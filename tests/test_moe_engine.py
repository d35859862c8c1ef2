"""The one 2-rank spawn of the MoE tests: the layer alone (``test_expert.check_ranks``), and an MoE model
through the engine: ZeRO stages 0-3 on 2 gloo ranks at ep_size 2 equal one process holding
every expert (weights, loss, gradient norm after clipped AdamW steps); expert state is in memory_report and
the checkpoint; a checkpoint saved at 2 ranks / ep_size 2 loads in one process / ep_size 1."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zerostep.core import Config, initialize
from zerostep.core.deepspeed_checkpoint import load_deepspeed_checkpoint
from zerostep.parallel.launch import spawn_ranks

M, E, ROWS, STEPS, WORLD = 8, 4, 6, 2, 2  # ROWS: tokens per rank and step


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(M, 12), nn.Linear(12, M)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


class MoENet(nn.Module):
    def __init__(self, ep_size: int, experts: int = E):
        from zerostep.moe.layer import MoE

        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, M)
        moe = MoE(M, Mlp(), num_experts=experts, ep_size=ep_size, k=2, min_capacity=0, drop_tokens=False)
        moe.deepspeed_moe.gate.top2_2nd_expert_sampling = False
        self.blocks = nn.ModuleList([moe])
        self.head = nn.Linear(M, 1)
        for i, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):  # distinct experts,
            torch.manual_seed(100 + moe.first_expert + i)  # seeded by global index (a rank holds its own)
            for p in expert.parameters():
                p.data.normal_(std=0.3)

    def forward(self, x):
        h = self.inp(x)
        out, l_aux, _ = self.blocks[0](h)
        return self.head(h + out), l_aux


def chunked_loss(chunks: int):
    def loss_fn(model, batch):
        # the mean over ranks of each rank's loss: the one process runs every rank's rows as its own chunk,
        # so the gate (capacity, aux loss) sees the same tokens as on that rank
        x, y = batch
        losses = []
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            pred, l_aux = model(xc)
            losses.append(F.mse_loss(pred, yc) + 0.01 * l_aux)
        return torch.stack(losses).mean()

    return loss_fn


def config(stage: int, world: int) -> Config:
    d = {
        "train_micro_batch_size_per_gpu": ROWS * WORLD // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.05,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 64, "allgather_bucket_size": 64},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
    }
    return Config.from_dict(d, world_size=world)


def batches():
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(ROWS * WORLD, 5, generator=g), torch.randn(ROWS * WORLD, 1, generator=g))
        for _ in range(STEPS)
    ]


def train(stage: int, world: int, rank: int, ep_size: int, save_dir=None, chunks=None):
    chunks = max(1, WORLD // world) if chunks is None else chunks
    engine = initialize(MoENet(ep_size), config(stage, world), loss_fn=chunked_loss(chunks), compile=False)
    state = engine.init()
    norms = []
    for x, y in batches():
        rows = slice(rank * ROWS * WORLD // world, (rank + 1) * ROWS * WORLD // world)
        state = engine.step(state, (x[rows], y[rows]))
        norms.append(float(state.metrics.grad_norm))
    if save_dir is not None:
        engine.save(state, save_dir, tag="t")
    memory = engine.memory_report(state)
    memory["held_numel"] = sum(lay.numel for lay in engine.plan.layouts.values())  # this rank's parameters
    return engine.full_params(state), norms, float(state.metrics.loss), memory


def resumed(stage: int, world: int, rank: int, ep_size: int, load_dir: str, parts: int = WORLD) -> dict:
    """A checkpoint loaded at (world, ep_size, stage), then one more step: its parameters by global name
    (the step shows that the optimizer state was resharded too). ``parts``: the batch is the gate's in
    that many pieces (the saving run's ranks), ``parts / world`` of them on each rank."""
    engine = initialize(
        MoENet(ep_size), config(stage, world), loss_fn=chunked_loss(parts // world), compile=False
    )
    state = engine.load(load_dir, tag="t")
    x, y = batches()[0]
    rows = slice(rank * ROWS * WORLD // world, (rank + 1) * ROWS * WORLD // world)
    return engine.full_params(engine.step(state, (x[rows], y[rows])))


def ranks(rank: int, world: int, save_dir: str) -> tuple:
    from test_expert import check_ranks

    layer = check_ranks(rank, world)  # the layer alone (tests/test_expert.py)
    per_stage = {stage: train(stage, world, rank, 2, save_dir if stage == 2 else None) for stage in range(4)}
    # ep_size 1 on 2 ranks: the expert-data-parallel group is the whole world (every rank holds every
    # expert and their gradients are summed over both), against ep_size 2 above (a group of one)
    ep1 = train(1, world, rank, 1, save_dir + "/ep1")
    # reshard: the ep_size-2 checkpoint at ep_size 1 (stage 3), the ep_size-1 one at ep_size 2 (stage 0)
    loads = {
        "ep2->ep1": resumed(3, world, rank, 1, save_dir),
        "ep1->ep2": resumed(0, world, rank, 2, save_dir + "/ep1"),
    }
    # DeepSpeed's MoE layout (written by the parent), at ep_size 2 and stage 1: each rank its experts
    engine = initialize(MoENet(2), config(1, world), loss_fn=chunked_loss(1), compile=False)
    loads["deepspeed"] = engine.full_params(
        load_deepspeed_checkpoint(engine, save_dir + "/ds", "t", False)[0]
    )
    # the DeepSpeed-style facade at ep_size 2, stage 1, against the functional engine on the same rows
    facade = facade_params(1, world, rank, 2), train(1, world, rank, 2, chunks=1)[0]
    return layer, per_stage, ep1, loads, facade


def check_equal_one_process(results: list, world: int, ep_size: int, want: tuple) -> None:
    """Each rank's (params, norms, loss, memory) per stage against one process holding every expert."""
    want_params, want_norms, want_loss, _ = want
    numel = sum(v.numel() for v in want_params.values())
    experts = sum(v.numel() for n, v in want_params.items() if ".deepspeed_experts." in n)
    dense, local = numel - experts, experts // ep_size  # this rank: the dense parameters, E / ep_size experts
    edp = world // ep_size
    for rank, per_stage in enumerate(results):
        for stage, (params, norms, loss, memory) in per_stage.items():
            assert params.keys() == want_params.keys()
            assert any("deepspeed_experts.3." in n for n in params)  # every expert, by global name
            for name, value in params.items():
                assert torch.allclose(value, want_params[name], rtol=1e-5, atol=1e-6), (rank, stage, name)
            assert norms == [pytest_approx(n) for n in want_norms], (rank, stage)
            assert abs(loss - want_loss) < 1e-5 * max(1.0, abs(want_loss)) * world
            assert memory["held_numel"] == dense + local, (rank, stage)
            # fp32 master: stage 0 all it holds; stages 1-3 the dense parameters sharded over the world,
            # its experts over their expert-data-parallel group; padding aside
            held = dense + local if stage == 0 else dense // world + local // edp
            assert held * 4 <= memory["master"] < held * 4 + 4096, (rank, stage, memory["master"])


def write_deepspeed_moe_checkpoint(path, weights: dict) -> None:
    """The files DeepSpeed's ``_save_moe_checkpoint`` writes at stage 0 (as its torch.save dicts): the
    model states without expert keys, and one file per (MoE layer, global expert) with its parameters."""
    tag = path / "t"
    tag.mkdir(parents=True)
    experts = {n: v for n, v in weights.items() if ".deepspeed_experts." in n}
    module = {n: v for n, v in weights.items() if n not in experts}
    states = {"module": module, "buffer_names": [], "optimizer": None, "global_steps": 7, "skipped_steps": 1}
    torch.save(
        {**states, "dp_world_size": 2, "num_experts": [E], "ds_version": "0.19.8"},
        tag / "mp_rank_00_model_states.pt",
    )
    for e in range(E):
        mine = {n: v for n, v in experts.items() if f".deepspeed_experts.{e}." in n}
        torch.save(mine, tag / f"layer_0_expert_{e}_mp_rank_00_model_states.pt")
    (path / "latest").write_text("t")


def test_deepspeed_moe_layout_and_another_num_experts(tmp_path):
    """DeepSpeed's MoE checkpoint files load (one process here, 2 ranks at ep_size 2 in the spawn); a
    checkpoint of 4 experts is refused by a model of 2, naming the counts."""
    from zerostep.io import CheckpointError

    weights = {n: torch.randn(p.shape) for n, p in MoENet(1).named_parameters()}
    write_deepspeed_moe_checkpoint(tmp_path / "ds", weights)
    engine = initialize(MoENet(1), config(0, 1), loss_fn=chunked_loss(1), compile=False)
    state, _ = load_deepspeed_checkpoint(engine, tmp_path / "ds", None, False)
    assert int(state.step) == 7 and int(state.skipped_steps) == 1
    for name, value in engine.full_params(state).items():
        assert torch.equal(value, weights[name]), name
    with pytest.raises(CheckpointError, match="optimizer state .* is not"):
        load_deepspeed_checkpoint(engine, tmp_path / "ds", None, True)
    engine.save(state, tmp_path / "z", tag="t")
    fewer = initialize(MoENet(1, experts=2), config(0, 1), loss_fn=chunked_loss(1), compile=False)
    with pytest.raises(CheckpointError, match="has 4 experts, this model's has 2"):
        fewer.load(tmp_path / "z", tag="t")


def test_stages_at_ep_size_2_equal_one_process(tmp_path):
    want = train(0, 1, 0, 1)
    ds_weights = {n: torch.randn(p.shape) for n, p in MoENet(1).named_parameters()}
    write_deepspeed_moe_checkpoint(tmp_path / "ds", ds_weights)
    out = spawn_ranks(ranks, WORLD, str(tmp_path), timeout=240)
    for rank, ((failures, ep_ranks, edp_ranks, ep_rank), *_) in enumerate(out):
        assert failures == [], (rank, failures)
        assert ep_ranks == (0, 1) and edp_ranks == (rank,) and ep_rank == rank
    check_equal_one_process([r[1] for r in out], WORLD, 2, want)
    check_equal_one_process([{1: r[2]} for r in out], WORLD, 1, want)
    # the stage-2 checkpoint of 2 ranks at ep_size 2, loaded by one process at ep_size 1
    engine = initialize(MoENet(1), config(2, 1), loss_fn=chunked_loss(WORLD), compile=False)
    loaded = engine.full_params(engine.load(str(tmp_path), tag="t"))
    for name, value in out[0][1][2][0].items():
        assert torch.equal(loaded[name], value), name
    # ... and resumed for a step there, at 2 ranks / ep_size 1, and (the ep_size-1 checkpoint) at ep_size 2
    for key, load_dir in (("ep2->ep1", str(tmp_path)), ("ep1->ep2", str(tmp_path / "ep1"))):
        one = resumed(2, 1, 0, 1, load_dir)
        for rank, r in enumerate(out):
            for name, value in r[3][key].items():
                assert torch.allclose(value, one[name], rtol=1e-5, atol=1e-6), (key, rank, name)
    for rank, r in enumerate(out):  # the facade at 2 ranks, ep_size 2
        got, want_facade = r[4]  # the module holds this rank's experts, full_params every expert
        assert got.keys() <= want_facade.keys() and sum(".deepspeed_experts." in n for n in got) == 8
        for name, value in got.items():
            assert torch.allclose(value, want_facade[name], atol=1e-6), (rank, name)
    for rank, r in enumerate(out):  # DeepSpeed's MoE files at 2 ranks, ep_size 2
        assert r[3]["deepspeed"].keys() == ds_weights.keys()
        for name, value in r[3]["deepspeed"].items():
            assert torch.equal(value, ds_weights[name]), (rank, name)


def ranks_of_four(rank: int, world: int, save_dir: str) -> tuple:
    per_stage = {stage: train(stage, world, rank, 2, save_dir if stage == 1 else None) for stage in range(4)}
    return per_stage, resumed(2, world, rank, 2, save_dir, parts=4)


@pytest.mark.skipif(
    os.environ.get("ZEROSTEP_SLOW_TESTS") != "1", reason="4 ranks: ~35 s; ZEROSTEP_SLOW_TESTS=1"
)
def test_four_ranks_at_ep_size_2_equal_one_process(tmp_path):
    """World 4, ep_size 2: expert-data-parallel groups of two ranks ([0, 2], [1, 3]), over which expert
    gradients are summed and ZeRO shards the experts; a checkpoint of it resumes in one process."""
    want = train(0, 1, 0, 1, chunks=4)
    out = spawn_ranks(ranks_of_four, 4, str(tmp_path), timeout=300)
    check_equal_one_process([r[0] for r in out], 4, 2, want)
    one = resumed(2, 1, 0, 1, str(tmp_path), parts=4)
    for rank, (_, params) in enumerate(out):
        for name, value in params.items():
            assert torch.allclose(value, one[name], rtol=1e-5, atol=1e-6), (rank, name)


def pytest_approx(x: float):
    return pytest.approx(x, rel=1e-5)


def facade_params(stage: int, world: int, rank: int, ep_size: int) -> dict:
    """The DeepSpeed-style script (``zerostep.initialize`` with DeepSpeed's MoE param groups, then
    ``engine(x)``, ``backward``, ``step``) on this rank's rows: the weights by global name."""
    import zerostep
    from zerostep.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from zerostep.parallel.expert import global_expert_name

    model = MoENet(ep_size)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "d"}
    )
    assert [g.get("moe", False) for g in groups] == [False, True]
    cfg = config(stage, world).to_dict()
    engine, _, _, _ = zerostep.initialize(model=model, model_parameters=groups, config=cfg, compile=False)
    rows = slice(rank * ROWS * WORLD // world, (rank + 1) * ROWS * WORLD // world)
    for x, y in batches():
        pred, l_aux = engine(x[rows])
        engine.backward(F.mse_loss(pred, y[rows]) + 0.01 * l_aux)
        engine.step()
    first = model.blocks[0].first_expert
    return {global_expert_name(n, first): p.detach().clone() for n, p in engine.module.named_parameters()}


def test_facade_with_deepspeeds_moe_param_groups_equals_the_functional_engine():
    got = facade_params(0, 1, 0, 1)
    want, _, _, _ = train(0, 1, 0, 1, chunks=1)
    for name, p in got.items():
        assert torch.allclose(p, want[name], atol=1e-6), name
