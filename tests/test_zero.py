"""ZeRO stages 0-3 on real gloo ranks equal one process on the concatenated batch; memory and bytes."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from models import Net, mse
from torch import nn

from zerostep.core import Config, initialize
from zerostep.parallel.collectives import detach_shared_memory
from zerostep.parallel.launch import RankFailure, spawn_ranks

MB, GAS, STEPS = 2, 2, 4


def make_config(stage: int, world_size: int, mb: int = MB, overlap: bool = False, **extra) -> Config:
    d = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": 0.05,
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": 16,
            "allgather_bucket_size": 16,
            "overlap_comm": overlap,
        },
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
    }
    d.update(extra)
    return Config.from_dict(d, world_size=world_size)


def global_batches(world_size: int):
    gen = torch.Generator().manual_seed(1)
    rows = MB * GAS * world_size
    return [(torch.randn(rows, 5, generator=gen), torch.randn(rows, 1, generator=gen)) for _ in range(STEPS)]


LAMB = {"type": "Lamb", "params": {"lr": 0.02, "weight_decay": 0.01}}


def train(rank: int, world_size: int, stage: int, compile: bool, overlap: bool = False, optimizer=None):
    extra = {"optimizer": optimizer} if optimizer else {}
    cfg = make_config(stage, world_size, overlap=overlap, **extra)
    engine = initialize(Net(), cfg, loss_fn=mse, compile=compile)
    state = engine.init()
    per = MB * GAS
    losses = []
    for x, y in global_batches(world_size):
        state = engine.step(state, (x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]))
        losses.append(float(state.metrics.loss))
    return engine.full_params(state), losses, engine.comm.bytes_per_step


def reference(world_size: int, optimizer=None):
    """One process, micro-batch MB * world_size: the same samples per micro-batch step as the ranks."""
    extra = {"optimizer": optimizer} if optimizer else {}
    engine = initialize(Net(), make_config(0, 1, mb=MB * world_size, **extra), loss_fn=mse, compile=False)
    state = engine.init()
    losses = []
    for x, y in global_batches(world_size):
        # Reorder rows so micro-batch i holds every rank's micro-batch i, as the ranks see them.
        per = MB * GAS
        idx = torch.cat(
            [
                torch.arange(r * per + i * MB, r * per + (i + 1) * MB)
                for i in range(GAS)
                for r in range(world_size)
            ]
        )
        state = engine.step(state, (x[idx], y[idx]))
        losses.append(float(state.metrics.loss))
    return engine.full_params(state), losses


def all_stages(
    rank: int, world_size: int, compile: bool, stages: tuple[int, ...], overlap: bool = False, optimizer=None
):
    return {stage: train(rank, world_size, stage, compile, overlap, optimizer) for stage in stages}


def check_equal(results, world_size, stages, optimizer=None):
    ref_params, ref_losses = reference(world_size, optimizer)
    for rank_out in results:
        for stage in stages:
            params, losses, _ = rank_out[stage]
            assert losses == pytest.approx(ref_losses, rel=1e-5), f"stage {stage}"
            for name, p in ref_params.items():
                err = float((params[name] - p).abs().max() / p.abs().max())
                assert err <= 1e-5, f"stage {stage} {name}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def eager_runs():
    stages = (0, 1, 2, 3)
    return {ws: spawn_ranks(all_stages, ws, False, stages, timeout=240) for ws in (2, 3)}


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_stage_equals_one_process_eager(world_size, eager_runs):
    check_equal(eager_runs[world_size], world_size, (0, 1, 2, 3))


def test_overlapped_communication_equals_one_process():
    # overlap_comm: collectives started from gradient hooks during backward (stages 0-2)
    stages = (0, 1, 2)
    results = spawn_ranks(all_stages, 3, False, stages, True, timeout=240)
    check_equal(results, 3, stages)


def test_lamb_trust_ratios_span_ranks():
    # a parameter split across two ranks' shards still gets one trust ratio (partial norms all-reduced)
    stages = (1, 3)
    results = spawn_ranks(all_stages, 2, False, stages, False, LAMB, timeout=240)
    check_equal(results, 2, stages, LAMB)


@pytest.mark.parametrize("world_size, shm", [(2, "1"), (3, "0")])
def test_every_stage_equals_one_process_compiled(world_size, shm):
    # overlap off: stages 0-2 compile forward/backward too. Over gloo (ZEROSTEP_SHM=0) the collectives
    # are traced into their own graphs; over shared memory they run eagerly between the graphs.
    stages = (0, 1, 2, 3)
    results = spawn_ranks(
        all_stages, world_size, True, stages, False, timeout=480, env={"ZEROSTEP_SHM": shm}
    )
    check_equal(results, world_size, stages)


def test_communication_bytes_per_step(eager_runs):
    results = eager_runs[2]
    net = Net()
    numel = sum(p.numel() for p in net.parameters())
    root = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("blocks."))
    for stage in (0, 1, 2, 3):
        per_step = results[0][stage][2]
        # fp32 Ψ bytes; stage 2 reduce-scatters every micro-batch (GAS times); stage 3 gathers each block
        # twice per micro-batch and the root unit (gathered throughout) once. At GAS=1 and without the
        # root these are DeepSpeed's 2Ψ, 2Ψ, 2Ψ, 3Ψ. Padding and the 8-byte finite check add a little.
        psi = 4 * numel
        expected = {0: 2 * psi, 1: 2 * psi, 2: (GAS + 1) * psi, 3: GAS * (3 * psi - 4 * root)}[stage]
        assert expected <= per_step <= expected * 1.1 + 16, (stage, per_step, expected)


def memory(rank: int, world_size: int):
    out = {}
    for stage in (0, 1, 2, 3):
        model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
        psi = sum(p.numel() for p in model.parameters())  # before stage 3 releases them to placeholders
        cfg = make_config(stage, world_size, bf16={"enabled": True})
        engine = initialize(model, cfg, loss_fn=lambda m, b: m(b).float().pow(2).mean(), compile=False)
        state = engine.step(engine.init(), torch.randn(MB * GAS, 64))
        out[stage] = engine.memory_report(state), psi
    return out


@pytest.fixture(scope="module")
def memory_reports():
    return spawn_ranks(memory, 3, timeout=180)[0]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_memory_matches_zero_table(stage, memory_reports):
    n = 3
    report, psi = memory_reports[stage]
    expected = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]
    # padding: each of the 4 units pads to a multiple of n elements, at most 16 bytes per element each
    assert expected <= report["total"] <= expected + 4 * 16 * n
    if stage == 3:
        assert 0 < report["stage3_gather_high_water"] < 2 * psi  # about one unit, not the model


def fail_mid_step(rank: int, world_size: int):
    engine = initialize(Net(), make_config(2, world_size), loss_fn=mse, compile=False)
    state = engine.init()
    x, y = global_batches(world_size)[0]
    if rank == 1:
        raise RuntimeError("rank 1 fails before its step")
    engine.step(state, (x[: MB * GAS], y[: MB * GAS]))


def test_failing_rank_makes_the_others_fail_not_hang():
    with pytest.raises(RankFailure, match="rank 1 fails before its step"):
        spawn_ranks(fail_mid_step, 2, timeout=90, collective_timeout=20)


class WithUnusedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 5)])
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.blocks[2](torch.tanh(self.blocks[0](x)))))  # blocks[1] unused


def unused_block(rank: int, world_size: int, stage: int):
    engine = initialize(
        WithUnusedBlock(), make_config(stage, world_size, overlap=True), loss_fn=mse, compile=False
    )
    state = engine.init()
    per = MB * GAS
    for x, y in global_batches(world_size):
        state = engine.step(state, (x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]))
    return engine.full_params(state)


def test_unused_block_with_overlapped_communication():
    for stage in (0, 2):
        out = spawn_ranks(unused_block, 2, stage, timeout=120)
        assert all(torch.equal(out[0][n], out[1][n]) for n in out[0])


class Reversed(Net):
    """Net whose forward runs its blocks in the opposite of module (and gather launch) order."""

    def forward(self, x):
        x = self.inp(x)
        for b in reversed(self.blocks):
            x = x + b(x)
        return self.head(x)


def deferred_gathers(rank: int, world_size: int, stage: int):
    """Stages 1-2 with overlap_comm leave the parameter all-gathers running after the step; every way of
    reading the state waits for them, and a step that raises leaves complete buffers."""
    per = MB * GAS
    batches = [
        (x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
        for x, y in global_batches(world_size)
    ]
    fail = {"now": False}

    def loss_fn(model, batch):
        if fail["now"]:
            raise RuntimeError("loss_fn fails on every rank")
        return mse(model, batch)

    # Gathers that finish only when waited for: until then the other ranks' rows hold NaN, so any read
    # that does not wait shows up in the losses and parameters.
    from zerostep.parallel import collectives

    real_gather = collectives.all_gather_rows

    def poisoned_until_waited(full, group, bucket_numel, async_op=False):
        done = full.clone()
        real_gather(done, group, bucket_numel)
        mine = full.view(world_size, -1)[rank].clone()
        full.fill_(float("nan"))
        full.view(world_size, -1)[rank] = mine
        pending = collectives.Pending([], lambda: full.data.copy_(done))  # as a collective writes
        return pending if async_op else pending.wait() and None

    collectives.all_gather_rows = poisoned_until_waited
    zero = {"stage": stage, "allgather_bucket_size": 16, "overlap_comm": True, "overlap_param_gather": True}
    config = make_config(stage, world_size, zero_optimization=zero)
    engine = initialize(Reversed(), config, loss_fn=loss_fn, compile=False)
    state = engine.step(engine.init(), batches[0])
    assert state.params._in_flight is not None  # the gathers really are left running
    state = engine.step(state, batches[1])  # its forward waits unit by unit, blocks in reverse order
    assert state.params._in_flight is not None
    copied = copy.deepcopy(state)  # waits, and carries no collective handle
    assert state.params._in_flight is None and copied.params._in_flight is None
    name = "blocks.1.0.weight"
    first_read = state.params[name].clone()  # waits
    assert state.params._in_flight is None
    assert torch.equal(first_read, engine.full_params(state)[name])
    assert not first_read.isnan().any()
    assert torch.equal(copied.params[name], first_read)

    state = engine.step(state, batches[2])
    eval_loss = engine.eval_step(state, batches[2])  # waits, then reads complete buffers
    state = engine.step(state, batches[3])
    fail["now"] = True
    with pytest.raises(RuntimeError, match="fails on every rank"):
        engine.step(state, batches[0])
    assert state.params._in_flight is None  # waited on the way out: the buffers are complete
    fail["now"] = False
    state = engine.step(state, batches[0]).block_until_ready()
    return engine.full_params(state), float(eval_loss), int(state.skipped_steps)


@pytest.mark.parametrize("stage", [1, 2])
def test_deferred_parameter_gathers_are_waited_for_on_every_read(stage):
    results = spawn_ranks(deferred_gathers, 2, stage, timeout=120)
    # the same training with the gathers completed inside each step (overlap off) gives the same params
    plain = spawn_ranks(train_reversed_plain, 2, stage, timeout=120)
    for (params, eval_loss, skipped), (want, want_eval, _) in zip(results, plain):
        assert skipped == 0 and eval_loss == want_eval
        for n in want:
            torch.testing.assert_close(params[n], want[n], rtol=1e-6, atol=0)


def train_reversed_plain(rank: int, world_size: int, stage: int):
    per = MB * GAS
    batches = [
        (x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
        for x, y in global_batches(world_size)
    ]
    # overlap_comm without overlap_param_gather (the default): gathered inside the step
    engine = initialize(Reversed(), make_config(stage, world_size, overlap=True), loss_fn=mse, compile=False)
    state = engine.step(engine.init(), batches[0])
    assert state.params._in_flight is None
    for batch in batches[1:3]:
        state = engine.step(state, batch)
    eval_loss = engine.eval_step(state, batches[2])
    for batch in batches[3:] + batches[:1]:
        state = engine.step(state, batch)
    return engine.full_params(state), float(eval_loss), int(state.skipped_steps)


def random_cases(n: int) -> list[dict]:
    """Configurations drawn by hypothesis in the parent; every rank runs all of them in one spawn."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    cases: list[dict] = []
    case = st.fixed_dictionaries(
        {
            "stage": st.integers(0, 3),
            "mb": st.integers(1, 3),
            "gas": st.integers(1, 3),
            "clip": st.sampled_from([0.0, 0.01, 1.0]),
            "hidden": st.integers(1, 9),
            "overlap": st.booleans(),
            "param_gather": st.booleans(),  # overlap_param_gather (acts with overlap at stages 1-2)
            "bucket": st.sampled_from([0, 5, 64]),
            "shm": st.booleans(),  # collectives through /dev/shm (parallel/shm.py) or gloo's TCP
        }
    )

    @settings(max_examples=n, database=None)
    @given(case)
    def collect(c):
        cases.append(c)

    collect()
    return cases[:n]


def run_case(rank: int, world_size: int, c: dict):
    if world_size > 1:  # (a rank process: the environment is its own)
        detach_shared_memory()  # initialize() attaches again unless ZEROSTEP_SHM=0
        os.environ["ZEROSTEP_SHM"] = "1" if c["shm"] else "0"
    cfg = {
        "train_micro_batch_size_per_gpu": c["mb"],
        "gradient_accumulation_steps": c["gas"],
        "gradient_clipping": c["clip"],
        "zero_optimization": {
            "stage": c["stage"],
            "overlap_comm": c["overlap"],
            "overlap_param_gather": c["param_gather"] and c["overlap"] and c["stage"] in (1, 2),
            "reduce_bucket_size": c["bucket"],
            "allgather_bucket_size": c["bucket"],
        },
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
    }
    engine = initialize(
        Net(c["hidden"]), Config.from_dict(cfg, world_size=world_size), loss_fn=mse, compile=False
    )
    assert engine.shared_memory == (c["shm"] and world_size > 1)
    state = engine.init()
    per = c["mb"] * c["gas"]
    gen = torch.Generator().manual_seed(c["hidden"])
    for _ in range(3):
        x, y = (
            torch.randn(per * world_size, 5, generator=gen),
            torch.randn(per * world_size, 1, generator=gen),
        )
        if world_size > 1:
            # rows so that rank r's micro-batch i is rows of the one-process micro-batch i
            idx = torch.cat(
                [
                    torch.arange(r * per + i * c["mb"], r * per + (i + 1) * c["mb"])
                    for i in range(c["gas"])
                    for r in range(world_size)
                ]
            )
            x, y = x[idx.argsort()], y[idx.argsort()]
        state = engine.step(state, (x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]))
    return engine.full_params(state)


def run_cases(rank: int, world_size: int, cases: list[dict]):
    return [run_case(rank, world_size, c) for c in cases]


def test_stage_equivalence_property():
    """Hypothesis-drawn stage, micro-batch, accumulation, clipping, width, overlap (of the reductions and
    of the stage 1-2 parameter gather), bucket size and transport (shared memory or gloo):
    three ranks equal one process (which sees every rank's micro-batch i as its micro-batch i)."""
    cases = random_cases(12)
    distributed = spawn_ranks(run_cases, 3, cases, timeout=300)
    for i, c in enumerate(cases):
        single = {**c, "mb": c["mb"] * 3, "stage": 0, "overlap": False, "param_gather": False}
        want = run_case(0, 1, single)
        for per_rank in distributed:
            for name, p in want.items():
                err = float((per_rank[i][name] - p).abs().max() / p.abs().max().clamp_min(1e-12))
                assert err <= 2e-5, (c, name, err)
