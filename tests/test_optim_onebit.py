"""1-bit Adam (optim/onebit_adam.py, core/compressed_phase.py): config keys, 2 gloo ranks against a
one-process simulation of the algorithm written here, a checkpoint resume after freeze_step, fp16."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from models import Net, mse
from test_compressed import reference as compressed_reference

from zerostep.core import Config, initialize
from zerostep.errors import ConfigError
from zerostep.parallel.compressed import compressed_numel
from zerostep.parallel.launch import spawn_ranks

MB, GAS, STEPS, FREEZE = 2, 2, 4, 2
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.99), 1e-8, 0.01

ONEBIT_ADAM = {
    "type": "OnebitAdam",
    "params": {
        "lr": LR,
        "freeze_step": FREEZE,
        "betas": list(BETAS),
        "eps": EPS,
        "weight_decay": WD,
        "bias_correction": False,
        "eps_inside_sqrt": False,
        "amsgrad": False,
        "cuda_aware": False,
        "comm_backend_name": "nccl",
    },
}


def make_config(world_size: int, fp16: bool = False, stage: int = 0, optimizer=ONEBIT_ADAM) -> Config:
    d = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "optimizer": optimizer,
    }
    if fp16:
        d["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return Config.from_dict(d, world_size=world_size)


def batches(world_size: int, steps: int = STEPS):
    gen = torch.Generator().manual_seed(1)
    rows = MB * GAS * world_size
    return [(torch.randn(rows, 5, generator=gen), torch.randn(rows, 1, generator=gen)) for _ in range(steps)]


def rank_batch(batch, rank: int):
    per = MB * GAS
    return batch[0][rank * per : (rank + 1) * per], batch[1][rank * per : (rank + 1) * per]


# --- the simulation: W ranks in one process, from the paper's equations ------------------------------


def layouts_of(engine) -> dict:
    return {
        g: ([(e.name, tuple(e.shape), e.offset) for e in lay.entries], lay.padded_numel)
        for g, lay in engine.plan.layouts.items()
    }


def local_grads(flats: dict, layouts: dict, batch) -> dict:
    """d mse / d params on one rank's samples (its GAS micro-batches of equal size: the mean)."""
    model = Net()
    named = {}
    for g, (entries, _) in layouts.items():
        for name, shape, offset in entries:
            named[name] = flats[g][offset : offset + math.prod(shape)].reshape(shape).clone().requires_grad_()
    loss = mse(lambda x: torch.func.functional_call(model, named, (x,)), batch)
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    out = {}
    for g, (entries, padded) in layouts.items():
        out[g] = torch.zeros(padded, dtype=torch.float64)
        for name, shape, offset in entries:
            out[g][offset : offset + math.prod(shape)] = grads[name].reshape(-1).double()
    return out


def simulate(flats0: dict, layouts: dict, world: int, steps: int, reset_at: int | None = None) -> list[dict]:
    """Master buffers after each step: warm-up Adam (no bias correction) on the mean gradient for
    FREEZE steps, then local momentum, compressed average, frozen variance; ``reset_at``: the error
    buffers restart at zero before that step (a checkpoint load)."""
    p = {g: t.double().clone() for g, t in flats0.items()}
    m = {g: torch.zeros_like(t) for g, t in p.items()}
    v = {g: torch.zeros_like(t) for g, t in p.items()}

    def zero_errors():
        out = {}
        for g, t in p.items():
            total = compressed_numel(t.numel(), world)
            out[g] = (
                [torch.zeros(total, dtype=torch.float64) for _ in range(world)],
                [torch.zeros(total // world, dtype=torch.float64) for _ in range(world)],
            )
        return out

    errors, history = zero_errors(), []
    for t, batch in enumerate(batches(world, steps)):
        if t == reset_at:
            errors = zero_errors()
        grads = [
            local_grads({g: x.float() for g, x in p.items()}, layouts, rank_batch(batch, r))
            for r in range(world)
        ]
        for g in p:
            b1, b2 = BETAS
            if t < FREEZE:
                mean = sum(gr[g] for gr in grads) / world
                m[g] = b1 * m[g] + (1 - b1) * mean
                v[g] = b2 * v[g] + (1 - b2) * mean * mean
            else:
                local = [b1 * m[g] + (1 - b1) * gr[g] for gr in grads]
                m[g] = compressed_reference(local, *errors[g]) if world > 1 else local[0]
                m[g][v[g] == 0] = 0.0  # the layout's padding (never a gradient there)
            p[g] = p[g] - LR * (m[g] / (v[g].sqrt() + EPS) + WD * p[g])
        history.append({g: x.clone() for g, x in p.items()})
    return history


# --- 2 gloo ranks ---------------------------------------------------------------------------------


def two_ranks(rank: int, world: int, save_dir: str) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = initialize(Net(), make_config(world), loss_fn=mse, compile=False)
    out = {"warnings": [str(w.message) for w in caught], "layouts": layouts_of(engine)}
    state = engine.init()
    out["flats0"] = {g: t.clone() for g, t in state.master.items()}
    history, comm = [], []
    for t, batch in enumerate(batches(world)):
        before = engine.comm.total_bytes
        state = engine.step(state, rank_batch(batch, rank))
        comm.append(engine.comm.total_bytes - before)
        history.append({g: x.clone() for g, x in state.master.items()})
        if t == 2:
            engine.save(state, save_dir)
            out["saved_exp_avg"] = {g: x.clone() for g, x in state.opt_state.exp_avg.items()}
    out["history"], out["comm"] = history, comm
    # resume after freeze_step: the load restarts error feedback and step 4 runs compressed
    resumed = initialize(Net(), make_config(world), loss_fn=mse, compile=False)
    state = resumed.load(save_dir)
    out["loaded_errors"] = float(sum(t.abs().sum() for t in state.opt_state.worker_error.values()))
    state = resumed.step(state, rank_batch(batches(world)[3], rank))
    out["resumed"] = {g: x.clone() for g, x in state.master.items()}
    # fp16 with dynamic loss scaling: the local gradient is unscaled before the momentum
    engine = initialize(Net(), make_config(world, fp16=True), loss_fn=mse, compile=False)
    state = engine.init()
    for batch in batches(world):
        state = engine.step(state, rank_batch(batch, rank))
    out["fp16"] = {g: x.clone() for g, x in state.master.items()}
    out["fp16_skipped"] = int(state.skipped_steps)
    # an overflow on rank 1 only, in the compressed phase: every rank skips (no half-run exchange)
    x, y = rank_batch(batches(world)[0], rank)
    if rank == 1:
        x = x.clone()
        x[0, 0] = float("inf")
    state = engine.step(state, (x, y))
    out["overflow_skipped"] = int(state.skipped_steps)
    out["overflow_unchanged"] = all(torch.equal(state.master[g], t) for g, t in out["fp16"].items())
    return out


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("onebit"))


@pytest.fixture(scope="module")
def ranks(save_dir):
    return spawn_ranks(two_ranks, 2, save_dir, timeout=300)


def test_two_ranks_equal_the_simulation_before_and_after_freeze_step(ranks):
    layouts, flats0 = ranks[0]["layouts"], ranks[0]["flats0"]
    want = simulate(flats0, layouts, 2, STEPS)
    for out in ranks:
        for t in range(STEPS):
            for g, x in out["history"][t].items():
                torch.testing.assert_close(
                    x.double(), want[t][g], rtol=1e-4, atol=1e-5, msg=f"step {t + 1} {g}"
                )
    # ranks hold the same parameters in both phases
    for g in flats0:
        assert torch.equal(ranks[0]["history"][-1][g], ranks[1]["history"][-1][g])
    # the comm_backend_name "nccl" runs over the gloo group, with a warning
    assert any("comm_backend_name" in w and "gloo" in w for w in ranks[0]["warnings"])
    # bytes: the warm-up all-reduces fp32 gradients (2x the buffer), the compressed steps send 1 bit per
    # element each way plus a 4-byte scale per rank per phase; both beside graph A's [sumsq, loss] pair
    padded = [numel for _, numel in layouts.values()]
    warm = 16 + sum(2 * 4 * n for n in padded)
    compressed = 16 + sum(2 * compressed_numel(n, 2) // 8 + 8 * 2 for n in padded)
    assert ranks[0]["comm"] == [warm, warm, compressed, compressed]


def test_resume_after_freeze_step_continues_compressed(ranks):
    layouts, flats0 = ranks[0]["layouts"], ranks[0]["flats0"]
    want = simulate(flats0, layouts, 2, STEPS, reset_at=3)[-1]
    for out in ranks:
        assert out["loaded_errors"] == 0.0
        for g, x in out["resumed"].items():
            torch.testing.assert_close(x.double(), want[g], rtol=1e-4, atol=1e-5)


def test_checkpoint_after_freeze_step_loads_at_one_rank(ranks, save_dir):
    """The moments reshard like any flat leaf; the error buffers restart, sized for the new world."""
    engine = initialize(Net(), make_config(1), loss_fn=mse, compile=False)
    for into in (None, engine.init()):
        state = engine.load(save_dir, into=into)
        assert int(state.step) == 3 and engine._phases.switch.compressed
        assert all(t.shape == (0, 0) for t in state.opt_state.worker_error.values())
        for g, m in state.opt_state.exp_avg.items():
            saved = ranks[0]["saved_exp_avg"][g]
            extent = max(offset + math.prod(shape) for _, shape, offset in ranks[0]["layouts"][g][0])
            torch.testing.assert_close(m[:extent], saved[:extent], rtol=0, atol=0)
        state = engine.step(state, batches(1)[3])
        assert torch.isfinite(state.metrics.loss)


def test_fp16_unscales_the_local_gradient(ranks):
    layouts, flats0 = ranks[0]["layouts"], ranks[0]["flats0"]
    want = simulate(flats0, layouts, 2, STEPS)[-1]
    start = sum(float((flats0[g].double() - want[g]).abs().max()) for g in want)
    for out in ranks:
        assert out["fp16_skipped"] == 0
        assert out["overflow_skipped"] == 1 and out["overflow_unchanged"]
        err = sum(float((out["fp16"][g].double() - want[g]).abs().max()) for g in want)
        # fp16 rounding may flip a few signs of the compressed momentum; an unscaled (x256) or
        # wrongly averaged gradient would be far off
        assert err < 0.2 * start, (err, start)


# --- one process --------------------------------------------------------------------------------------


def test_config_takes_every_deepspeed_key_case_insensitively():
    for kind in ("OneBitAdam", "OnebitAdam", "onebitadam"):
        c = Config.from_dict(
            {"train_micro_batch_size_per_gpu": 1, "optimizer": {**ONEBIT_ADAM, "type": kind}}
        )
        assert c.optimizer.type == "onebitadam"
    import zerostep.optim as zo

    opt = zo.from_config(ONEBIT_ADAM)
    assert opt.hyperparams["freeze_step"] == FREEZE and opt.hyperparams["comm_backend_name"] == "nccl"
    params = dict(ONEBIT_ADAM["params"], bias_correction=True, cuda_aware=True)
    with pytest.warns(UserWarning) as caught:
        zo.from_config({"type": "OneBitAdam", "params": params})
    text = " | ".join(str(w.message) for w in caught)
    assert "bias_correction = true has no effect" in text and "cuda_aware = true has no effect" in text


@pytest.mark.parametrize(
    "params, match",
    [
        ({"freeze_step": -1}, "freeze_step: -1.0 is invalid"),
        ({"freeze_step": 2.5}, "freeze_step: 2.5 is invalid"),
        ({"comm_backend_name": "tcp"}, "comm_backend_name: 'tcp' is not a DeepSpeed comm backend"),
        ({"comm_backend_name": 3}, "comm_backend_name: 3 is invalid"),
        ({"amsgrad": True}, "amsgrad"),
        ({"var_freeze_step": 3}, "unknown key"),
    ],
)
def test_bad_config(params, match):
    import zerostep.optim as zo

    with pytest.raises(ConfigError, match=match):
        zo.from_config({"type": "OneBitAdam", "params": params})


def test_zero_stages_above_0_are_refused():
    with pytest.raises(ConfigError, match="needs zero_optimization.stage 0"):
        initialize(Net(), make_config(1, stage=1), loss_fn=mse, compile=False)


def test_world_size_1_freezes_the_variance_without_communicating():
    """DeepSpeed at one rank skips the compressed all-reduce (size > 1) and still freezes the variance
    after freeze_step; compiled: the warm-up runs the compiled step, the compressed phase the eager one."""
    engine = initialize(Net(), make_config(1), loss_fn=mse, compile=True)
    state = engine.init()
    flats0 = {g: t.clone() for g, t in state.master.items()}
    for batch in batches(1):
        state = engine.step(state, batch)
    want = simulate(flats0, layouts_of(engine), 1, STEPS)[-1]
    for g, x in state.master.items():
        torch.testing.assert_close(x.double(), want[g], rtol=1e-4, atol=1e-5)
    assert engine.comm.total_bytes == 0
    assert all(t.numel() == 0 for t in state.opt_state.worker_error.values())
