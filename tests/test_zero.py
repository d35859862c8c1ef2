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
from zerostep.parallel.zero3 import ROOT_UNIT, plan_units

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
    return {ws: spawn_ranks(all_stages, ws, False, EAGER_STAGES[ws], timeout=240) for ws in (2, 3)}


# at 3 ranks the shards are uneven: the sharded stages (stage 0's all-reduce is the same at 2)
EAGER_STAGES = {2: (0, 1, 2, 3), 3: (1, 2, 3)}


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_stage_equals_one_process_eager(world_size, eager_runs):
    check_equal(eager_runs[world_size], world_size, EAGER_STAGES[world_size])


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


# uneven shards: the eager runs at 3. Each transport takes one all-reduce stage and one reduce-scatter
# stage (all four stages on both cost 60 s of compiling on 2 cores).
@pytest.mark.parametrize("world_size, shm, stages", [(2, "1", (0, 2)), (2, "0", (1, 3))])
def test_every_stage_equals_one_process_compiled(world_size, shm, stages):
    # overlap off: stages 0-2 compile forward/backward too. Over gloo (ZEROSTEP_SHM=0) the collectives
    # are traced into their own graphs; over shared memory they run eagerly between the graphs.
    results = spawn_ranks(all_stages, world_size, True, stages, False, timeout=480, env={"ZEROSTEP_SHM": shm})
    check_equal(results, world_size, stages)


def test_communication_bytes_per_step(eager_runs):
    results = eager_runs[2]
    units = plan_units(Net(), 2)  # the flat buffers moved: parameters plus alignment padding
    numel = sum(u.layout.padded_numel for u in units)
    root = sum(u.layout.padded_numel for u in units if u.name == ROOT_UNIT)
    for stage in (0, 1, 2, 3):
        per_step = results[0][stage][2]
        # fp32 Ψ bytes; stage 2 reduce-scatters every micro-batch (GAS times); stage 3 gathers each block
        # twice per micro-batch and the root unit (gathered throughout) once. At GAS=1 and without the
        # root these are DeepSpeed's 2Ψ, 2Ψ, 2Ψ, 3Ψ. The 8-byte finite check adds a little.
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
    # padding (parallel/flat.py aligns entries and shards to 16 elements), at most 16 bytes per element,
    # and a few scalars
    units = plan_units(nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)]), n)
    padding = sum(u.layout.padded_numel - u.layout.numel for u in units)
    assert expected <= report["total"] <= expected + 16 * padding + 16
    if stage == 3:
        assert 0 < report["stage3_gather_high_water"] < 2 * psi  # about one unit, not the model


UNITS, WIDTH = 8, 128  # eight equal units of one Linear each; activations are negligible beside them


def peak_before_update(engine, state, batch):
    """(bytes a step allocates before its update, the state after it), by the profiler."""
    from memory_probe import peak_bytes

    reducer, result = engine._reducer, engine._reducer.result

    def run(mark):
        reducer.result = lambda: (mark(), result())[1]  # the update starts after result()
        try:
            return engine.step(state, batch)
        finally:
            del reducer.result

    return peak_bytes(run)


def gradient_peaks(rank: int, world_size: int):
    """Per stage: the bytes a step allocates before its update (its gradient memory: activations are
    tiny here) measured by the profiler, and what memory_report says."""
    out = {}
    for stage in (0, 1, 2, 3):
        model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(UNITS)])
        cfg = make_config(stage, world_size, zero_optimization={"stage": stage})
        engine = initialize(model, cfg, loss_fn=lambda m, b: m(b).pow(2).mean(), compile=False)
        batch = torch.randn(MB * GAS, WIDTH)
        state = engine.step(engine.init(), batch)  # warm-up
        peak, state = peak_before_update(engine, state, batch)
        out[stage] = peak, engine.memory_report(state)
    return out


def test_stage2_gradient_peak_is_a_shard_plus_a_unit():
    """Stage 2 reduce-scatters each unit's gradient inside backward and frees it: its gradient peak is
    1/N of stage 1's plus about two units (a parameter's gradient and its unit's buffer), not stage 1's.
    memory_report's ``gradients_peak`` matches what the profiler sees."""
    n = 3
    peaks = spawn_ranks(gradient_peaks, n, timeout=300)[0]
    unit = -(-(WIDTH * WIDTH + WIDTH) // n) * n * 4  # one unit's padded fp32 gradient
    assert peaks[2][0] <= peaks[1][0] / n + 2.5 * unit, {s: p / unit for s, (p, _) in peaks.items()}
    for stage, (peak, report) in peaks.items():
        allowed = report["gradients_peak"] + report["stage3_gather_high_water"] + unit // 4
        assert peak <= allowed, (stage, peak / unit, report)  # never more than reported
        if stage < 3:
            assert peak >= 0.95 * report["gradients_peak"], (stage, peak / unit, report)  # nor much less
    assert peaks[2][1]["gradients"] == UNITS * unit // n  # the accumulator: a shard


class Weights(nn.Module):
    """One parameter vector; the loss of a row x is (w * x).sum(), so its gradient is x exactly."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return (self.w * x).sum()


# Micro-batch gradients whose bf16 running sum stalls: 1 + 2**-8 rounds back to 1 (a tie, to even)
# every time, while fp32 sums them to 1 + 2**-7, which bf16 holds exactly (so one rounding, for the
# collective, keeps it). Every value and every scaling (1/GAS, 1/ranks) is exact in bf16.
ROWS = (1.0, 2.0**-8, 2.0**-8, 0.0)


ACCUMS = (("fp32", -sum(ROWS) / len(ROWS)), (None, -ROWS[0] / len(ROWS)), ("bf16", -ROWS[0] / len(ROWS)))


def accumulate_bf16(rank: int, world_size: int):
    """w after one SGD step (lr 1 from 0: minus the mean gradient), by accumulation dtype and stage."""
    out = {}
    for accum, _ in ACCUMS:
        for stage in (0, 1, 2, 3):
            cfg = {
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": len(ROWS),
                "zero_optimization": {"stage": stage},
                "bf16": {"enabled": True},
                "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
            }
            if accum is not None:
                cfg["data_types"] = {"grad_accum_dtype": accum}
            engine = initialize(
                Weights(),
                Config.from_dict(cfg, world_size=world_size),
                loss_fn=lambda m, b: m(b).float(),
                compile=False,
            )
            batch = torch.tensor(ROWS).unsqueeze(1).expand(len(ROWS), 4)  # micro-batch i: a row of ROWS[i]
            out[accum, stage] = engine.full_params(engine.step(engine.init(), batch))["w"]
    return out


def test_bf16_gradients_accumulate_in_fp32_as_configured():
    # fp32: the exact mean of the micro-batch gradients; None (DeepSpeed 0.19's default: the compute
    # dtype) and bf16: what a bf16 running sum gives
    per_rank = spawn_ranks(accumulate_bf16, 2, timeout=240) + [accumulate_bf16(0, 1)]
    for out in per_rank:
        for accum, want in ACCUMS:
            for stage in (0, 1, 2, 3):
                w = out[accum, stage]
                assert torch.equal(w, torch.full((4,), want)), (accum, stage, w)


def test_grad_accum_dtype_must_hold_the_compute_dtype():
    from zerostep.core import ConfigError

    cfg = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    for block, dtype in (({"bf16": {"enabled": True}}, "fp16"), ({}, "bf16"), ({}, "fp16")):
        d = {**cfg, **block, "data_types": {"grad_accum_dtype": dtype}}
        with pytest.raises(ConfigError, match="grad_accum_dtype"):
            initialize(Weights(), Config.from_dict(d, world_size=1), compile=False)


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


def unused_block_stages(rank: int, world_size: int, stages: tuple[int, ...]):
    return [unused_block(rank, world_size, stage) for stage in stages]


def test_unused_block_with_overlapped_communication():
    out = spawn_ranks(unused_block_stages, 2, (0, 2), timeout=120)  # one spawn for both stages
    for per_stage in zip(*out):
        assert all(torch.equal(per_stage[0][n], per_stage[1][n]) for n in per_stage[0])


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
    try:
        return _deferred_gathers(rank, world_size, stage, batches, fail, loss_fn)
    finally:
        collectives.all_gather_rows = real_gather


def _deferred_gathers(rank, world_size, stage, batches, fail, loss_fn):
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


def deferred_and_plain(rank: int, world_size: int) -> dict:
    # the plain runs first: deferred_gathers patches (and then restores) the row gather
    plain = {stage: train_reversed_plain(rank, world_size, stage) for stage in (1, 2)}
    return {stage: (deferred_gathers(rank, world_size, stage), plain[stage]) for stage in (1, 2)}


def test_deferred_parameter_gathers_are_waited_for_on_every_read():
    # the same training with the gathers completed inside each step (overlap_param_gather off) gives the
    # same params; one spawn runs both stages, both ways
    for per_rank in spawn_ranks(deferred_and_plain, 2, timeout=180):
        for (params, eval_loss, skipped), (want, want_eval, _) in per_rank.values():
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


def random_cases(n: int, bf16: bool = False) -> list[dict]:
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
            "bf16": st.just(bf16),  # bf16 compute, fp32 gradient accumulation (data_types.grad_accum_dtype)
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
    if c.get("bf16"):
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": c.get("accum", "fp32")}
        # SGD: the update is the gradient itself, so its error is the gradient's (Adam's first steps
        # are lr * sign(g), which bf16 noise flips for gradients near zero)
        cfg["optimizer"] = {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}}
    engine = initialize(
        Net(c["hidden"]), Config.from_dict(cfg, world_size=world_size), loss_fn=mse_fp32, compile=False
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


def mse_fp32(model, batch):
    return mse(model, batch).float()


def run_cases(rank: int, world_size: int, cases: list[dict]):
    return [run_case(rank, world_size, c) for c in cases]


# bf16: the distance to one process, over the size of one process's whole update. What remains is
# bf16 rounding of each micro-batch's gradient (one process's larger matmuls round differently) and of
# the reduced sums in the collectives: measured 5e-4 to 9e-3 over 34 drawn cases; a gradient that is
# wrong by a micro-batch or a rank is off by tens of percent.
BF16_TOLERANCE = 2e-2


def relative_to_update(got: dict, want: dict, initial: dict) -> float:
    distance = sum(float((got[n].float() - p.float()).pow(2).sum()) for n, p in want.items())
    update = sum(float((p.float() - initial[n]).pow(2).sum()) for n, p in want.items())
    return (distance / update) ** 0.5


def test_stage_equivalence_property():
    """Hypothesis-drawn stage, micro-batch, accumulation, clipping, width, overlap (of the reductions and
    of the stage 1-2 parameter gather), bucket size, transport (shared memory or gloo) and precision
    (fp32, or bf16 with fp32 accumulation and SGD): three ranks equal one process (which sees every
    rank's micro-batch i as its micro-batch i), in fp32 to 2e-5 of every tensor, in bf16 to
    ``BF16_TOLERANCE`` of the update."""
    cases = random_cases(8) + random_cases(4, bf16=True)
    distributed = spawn_ranks(run_cases, 3, cases, timeout=300)
    for i, c in enumerate(cases):
        single = {**c, "mb": c["mb"] * 3, "stage": 0, "overlap": False, "param_gather": False}
        want = run_case(0, 1, single)
        if c["bf16"]:
            initial = {n: p.detach() for n, p in Net(c["hidden"]).named_parameters()}
            for per_rank in distributed:
                err = relative_to_update(per_rank[i], want, initial)
                assert err <= BF16_TOLERANCE, (c, err)
            continue
        for per_rank in distributed:
            for name, p in want.items():
                err = float((per_rank[i][name] - p).abs().max() / p.abs().max().clamp_min(1e-12))
                assert err <= 2e-5, (c, name, err)
