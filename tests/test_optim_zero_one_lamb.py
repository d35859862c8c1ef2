"""0/1 Adam and 1-bit LAMB (optim/zero_one_adam.py, optim/onebit_lamb.py, core/compressed_phase.py): one
2-rank gloo spawn running both against one-process simulations written here from DeepSpeed's equations
(its onebit/zoadam.py and onebit/lamb.py, counters included), with a checkpoint resume after the
freeze; in process: the warm-up against plain Adam/LAMB, one rank, config keys and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from models import Net, mse
from test_compressed import reference as compressed_reference
from test_optim_onebit import batches, layouts_of, local_grads, make_config, rank_batch

import zerostep.optim as zo
from zerostep.core import Config, initialize
from zerostep.errors import ConfigError
from zerostep.optim.zero_one_adam import ZeroOneSchedule
from zerostep.parallel.compressed import compressed_numel
from zerostep.parallel.launch import spawn_ranks

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.99), 1e-8, 0.01
# 0/1 Adam: kappa 1 and scaler 1 make every variant appear in 8 steps:
# full, full, onebit, full | first-sync, sync, local, sync
ZOADAM_STEPS, ZOADAM_SAVE = 8, 7  # saved after the local step 7: u and lrs hold a step
ZERO_ONE_ADAM = {
    "type": "ZeroOneAdam",
    "params": {
        "lr": LR,
        "betas": list(BETAS),
        "eps": EPS,
        "weight_decay": WD,
        "var_freeze_step": 3,
        "var_update_scaler": 1,
        "local_step_scaler": 1,
        "local_step_clipper": 4,
        "bias_correction": False,
        "eps_inside_sqrt": False,
        "amsgrad": False,
        "cuda_aware": False,
        "comm_backend_name": "nccl",
    },
}
LAMB_STEPS, LAMB_SAVE, LAMB_FREEZE = 5, 4, 2
COEFF_BETA, FACTOR_MAX, FACTOR_MIN, FACTOR_THRESHOLD = 0.8, 4.0, 0.5, 0.1
ONEBIT_LAMB = {
    "type": "OneBitLamb",
    "params": {
        "lr": LR,
        "freeze_step": LAMB_FREEZE,
        "betas": list(BETAS),
        "eps": EPS,
        "weight_decay": WD,
        "max_coeff": 10.0,
        "min_coeff": 0.01,
        "coeff_beta": COEFF_BETA,
        "factor_max": FACTOR_MAX,
        "factor_min": FACTOR_MIN,
        "factor_threshold": FACTOR_THRESHOLD,
        "bias_correction": False,
        "eps_inside_sqrt": False,
        "amsgrad": False,
        "cuda_aware": False,
        "comm_backend_name": "mpi",
    },
}


# --- the simulations: W ranks in one process, fp64 ----------------------------------------------


def covered(layouts: dict) -> dict:
    """Per group, the elements some parameter covers (the rest is padding: DeepSpeed's exp_avg_mask)."""
    out = {}
    for g, (entries, padded) in layouts.items():
        out[g] = torch.zeros(padded, dtype=torch.bool)
        for _, shape, offset in entries:
            out[g][offset : offset + math.prod(shape)] = True
    return out


def zero_errors(flats: dict, world: int) -> dict:
    out = {}
    for g, t in flats.items():
        total = compressed_numel(t.numel(), world)
        out[g] = (
            [torch.zeros(total, dtype=torch.float64) for _ in range(world)],
            [torch.zeros(total // world, dtype=torch.float64) for _ in range(world)],
        )
    return out


def average(values: list, errors, mask) -> torch.Tensor:
    out = compressed_reference(values, *errors) if len(values) > 1 else values[0].clone()
    out[~mask] = 0.0
    return out


def simulate_zero_one_adam(flats0, layouts, world, steps, resume_at=None):
    """DeepSpeed's ZeroOneAdam.step per rank, its policy counters as its state dict keeps them (step 1
    a real full step outside the counters: zerostep has no dummy step). ``resume_at``: before that
    step every rank takes the saved state and the error feedback restarts (a checkpoint load). A
    stage-0 save writes each rank's slice of its own buffers, and between syncs the ranks' p, m and u
    differ: the resume continues from the stitch of the ranks' slices (exact at a sync step)."""
    hp = ZERO_ONE_ADAM["params"]
    kappa, scaler, clipper, vfs = (
        hp[k] for k in ("var_update_scaler", "local_step_scaler", "local_step_clipper", "var_freeze_step")
    )
    b1, b2 = BETAS
    mask = covered(layouts)
    ranks = [
        {
            "p": {g: t.double().clone() for g, t in flats0.items()},
            "m": {g: torch.zeros(t.numel(), dtype=torch.float64) for g, t in flats0.items()},
            "u": {g: torch.zeros(t.numel(), dtype=torch.float64) for g, t in flats0.items()},
        }
        for _ in range(world)
    ]
    v = {g: torch.zeros(t.numel(), dtype=torch.float64) for g, t in flats0.items()}
    pol = {"var_interval": 1, "var_counter": 0, "local_step_interval": 1, "local_step_counter": 0}
    errors, frozen, lrs, history, policies = zero_errors(flats0, world), False, 0.0, [], []
    for k, batch in enumerate(batches(world, steps), start=1):
        if k == resume_at:  # every rank loads the stitch of each rank's own slice (a stage-0 save)
            stitched = {
                key: {g: torch.cat([r[key][g].chunk(world)[i] for i, r in enumerate(ranks)]) for g in v}
                for key in ranks[0]
            }
            ranks = [
                {key: {g: t.clone() for g, t in x.items()} for key, x in stitched.items()}
                for _ in range(world)
            ]
            errors = zero_errors(flats0, world)
        policies.append(dict(pol))
        grads = [
            local_grads({g: x.float() for g, x in r["p"].items()}, layouts, rank_batch(batch, i))
            for i, r in enumerate(ranks)
        ]
        for g in v:
            if not frozen:
                if k % pol["var_interval"] == 0:
                    mean = sum(gr[g] for gr in grads) / world
                    v[g] = b2 * v[g] + (1 - b2) * mean * mean
                else:
                    mean = average([gr[g] for gr in grads], errors[g], mask[g])
                for r in ranks:
                    r["m"][g] = b1 * r["m"][g] + (1 - b1) * mean
                    r["p"][g] = r["p"][g] - LR * (r["m"][g] / (v[g].sqrt() + EPS) + WD * r["p"][g])
                continue
            denom = v[g].sqrt() + EPS
            for r, gr in zip(ranks, grads):
                r["m"][g] = b1 * r["m"][g] + (1 - b1) * gr[g]
                update = r["m"][g] / denom + WD * r["p"][g]
                r["p"][g] = r["p"][g] - LR * update
                r["u"][g] = r["u"][g] - LR * update
            if k % pol["local_step_interval"] == 0:
                avg = average([r["u"][g] * denom for r in ranks], errors[g], mask[g])
                for r in ranks:
                    r["p"][g] = r["p"][g] - r["u"][g] + avg / denom
                    r["m"][g] = -avg / (lrs + LR)
                    r["u"][g] = torch.zeros_like(avg)
        if frozen:
            lrs = 0.0 if k % pol["local_step_interval"] == 0 else lrs + LR
            pol["local_step_counter"] += 1
            if pol["local_step_counter"] == scaler:
                pol["local_step_counter"] = 0
                pol["local_step_interval"] = min(clipper, 2 * pol["local_step_interval"])
        else:
            if k % pol["var_interval"] == 0 and k >= 2:
                pol["var_counter"] += 1
                if pol["var_counter"] == kappa:
                    pol["var_counter"], pol["var_interval"] = 0, 2 * pol["var_interval"]
            if k > vfs:
                frozen, errors = True, zero_errors(flats0, world)
        history.append([{g: x.clone() for g, x in r["p"].items()} for r in ranks])
    return history, policies


def simulate_onebit_lamb(flats0, layouts, world, steps, resume_at=None):
    """DeepSpeed's OnebitLamb.step (ranks stay identical: every update reads the averaged momentum)."""
    b1, b2 = BETAS
    mask = covered(layouts)
    p = {g: t.double().clone() for g, t in flats0.items()}
    m = {g: torch.zeros_like(t) for g, t in p.items()}
    v = {g: torch.zeros_like(t) for g, t in p.items()}
    entries = {g: [(o, o + math.prod(s)) for _, s, o in es] for g, (es, _) in layouts.items()}
    coeff = {(g, e): 0.0 for g in p for e in entries[g]}
    last = {key: 1.0 for key in coeff}
    errors, history, fresh, scaling = zero_errors(flats0, world), [], None, None
    for k, batch in enumerate(batches(world, steps), start=1):
        if k == resume_at:
            errors = zero_errors(flats0, world)
        grads = [
            local_grads({g: x.float() for g, x in p.items()}, layouts, rank_batch(batch, r))
            for r in range(world)
        ]
        if k <= LAMB_FREEZE:
            for g in p:
                mean = sum(gr[g] for gr in grads) / world
                m[g] = b1 * m[g] + (1 - b1) * mean
                v[g] = b2 * v[g] + (1 - b2) * mean * mean
                for a, b in entries[g]:
                    update = m[g][a:b] / (v[g][a:b].sqrt() + EPS) + WD * p[g][a:b]
                    w_norm, u_norm = float(p[g][a:b].norm()), float(update.norm())
                    c = min(max(w_norm / u_norm, 0.01), 10.0) if w_norm and u_norm else 1.0
                    if c != 1.0:
                        coeff[g, (a, b)] = COEFF_BETA * coeff[g, (a, b)] + (1 - COEFF_BETA) * c
                    p[g][a:b] -= LR * c * update
            history.append({g: x.clone() for g, x in p.items()})
            continue
        if fresh is None:
            fresh = {g: x.clone() for g, x in v.items()}
            rms = {
                (g, e): float(m[g][e[0] : e[1]].norm()) / math.sqrt(e[1] - e[0])
                for g in p
                for e in entries[g]
            }
            united = sum(rms.values()) / len(rms)
            scaling = {key: united / r for key, r in rms.items()}
        for g in p:
            scale = torch.ones_like(p[g])
            for e in entries[g]:
                scale[e[0] : e[1]] = scaling[g, e]
            m_last = m[g]
            m[g] = (
                average([(b1 * m[g] + (1 - b1) * gr[g]) * scale for gr in grads], errors[g], mask[g]) / scale
            )
            rebuilt = (m[g] - b1 * m_last) / (1 - b1)
            fresh[g] = b2 * fresh[g] + (1 - b2) * rebuilt * rebuilt
            for a, b in entries[g]:
                denom = v[g][a:b].sqrt() + EPS
                prelim = m[g][a:b] / denom
                update = prelim + WD * p[g][a:b]
                factor = float((denom / (fresh[g][a:b].sqrt() + EPS)).max())
                ratio = min(1.0, float(prelim.norm() / update.norm()))
                factor = factor * ratio + (1.0 - ratio)
                factor = min(max(factor, FACTOR_MIN), FACTOR_MAX)
                prev = last[g, (a, b)]
                factor = min(max(factor, prev * (1 - FACTOR_THRESHOLD)), prev * (1 + FACTOR_THRESHOLD))
                last[g, (a, b)] = factor
                p[g][a:b] -= LR * coeff[g, (a, b)] * factor * update
        history.append({g: x.clone() for g, x in p.items()})
    return history


# --- 2 gloo ranks: both optimizers in one spawn ---------------------------------------------------


def run_optimizer(rank: int, world: int, block: dict, steps: int, save_at: int, save_dir: str) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = initialize(Net(), make_config(world, optimizer=block), loss_fn=mse, compile=False)
    out = {"warnings": [str(w.message) for w in caught], "layouts": layouts_of(engine)}
    state = engine.init()
    out["flats0"] = {g: t.clone() for g, t in state.master.items()}
    history, comm, variants, counters = [], [], [], []
    for t, batch in enumerate(batches(world, steps), start=1):
        variants.append(engine._phases.switch.variant)
        o = state.opt_state
        if hasattr(o, "var_interval"):
            counters.append(
                tuple(
                    int(x)
                    for x in (o.var_interval, o.var_counter, o.local_step_interval, o.local_step_counter)
                )
            )
        before = engine.comm.total_bytes
        state = engine.step(state, rank_batch(batch, rank))
        comm.append(engine.comm.total_bytes - before)
        history.append({g: x.clone() for g, x in state.master.items()})
        if t == save_at:
            engine.save(state, save_dir)
    out.update(history=history, comm=comm, variants=variants, counters=counters)
    resumed = initialize(Net(), make_config(world, optimizer=block), loss_fn=mse, compile=False)
    state = resumed.load(save_dir)
    out["resumed_variant"] = resumed._phases.switch.variant
    for batch in batches(world, steps)[save_at:]:
        state = resumed.step(state, rank_batch(batch, rank))
    out["resumed"] = {g: x.clone() for g, x in state.master.items()}
    return out


def two_ranks(rank: int, world: int, save_dir: str) -> dict:
    return {
        "zoadam": run_optimizer(rank, world, ZERO_ONE_ADAM, ZOADAM_STEPS, ZOADAM_SAVE, f"{save_dir}/zoadam"),
        "lamb": run_optimizer(rank, world, ONEBIT_LAMB, LAMB_STEPS, LAMB_SAVE, f"{save_dir}/lamb"),
    }


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("zo_lamb"))


@pytest.fixture(scope="module")
def ranks(save_dir):
    return spawn_ranks(two_ranks, 2, save_dir, timeout=300)


def assert_close(x: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(x.double(), want, rtol=1e-4, atol=1e-5, msg=what)


def test_zero_one_adam_two_ranks_equal_deepspeeds_equations(ranks):
    first = ranks[0]["zoadam"]
    layouts, flats0 = first["layouts"], first["flats0"]
    want, policies = simulate_zero_one_adam(flats0, layouts, 2, ZOADAM_STEPS)
    assert first["variants"] == ["full", "full", "onebit", "full", "first-sync", "sync", "local", "sync"]
    for rank, out in enumerate(ranks):
        out = out["zoadam"]
        for t in range(ZOADAM_STEPS):
            for g, x in out["history"][t].items():
                assert_close(x, want[t][rank][g], f"rank {rank} step {t + 1} {g}")
        # the state's policy counters are DeepSpeed's, and the host's schedule derives the same
        schedule = ZeroOneSchedule(3, 1, 1, 4)
        keys = ("var_interval", "var_counter", "local_step_interval", "local_step_counter")
        assert out["counters"] == [tuple(p[k] for k in keys) for p in policies]
        assert out["counters"] == [schedule.counters_at(k) for k in range(1, ZOADAM_STEPS + 1)]
    # the local step 7 moves the ranks apart; the sync brings them together (up to the rounding of
    # undoing each rank's own local steps, as in DeepSpeed)
    g = next(iter(flats0))
    apart = ranks[0]["zoadam"]["history"][6][g] - ranks[1]["zoadam"]["history"][6][g]
    together = ranks[0]["zoadam"]["history"][7][g] - ranks[1]["zoadam"]["history"][7][g]
    assert float(apart.abs().max()) > 1e-4 and float(together.abs().max()) < 1e-6
    assert any("comm_backend_name" in w and "gloo" in w for w in first["warnings"])
    # bytes per variant: the full steps all-reduce fp32 gradients, the onebit and sync steps send 1 bit
    # per element each way plus scales, the local step only graph A's [sumsq, loss] pair
    padded = [numel for _, numel in layouts.values()]
    full = 16 + sum(2 * 4 * n for n in padded)
    onebit = 16 + sum(2 * compressed_numel(n, 2) // 8 + 8 * 2 for n in padded)
    assert first["comm"] == [full, full, onebit, full, onebit, onebit, 16, onebit]


def test_zero_one_adam_resume_mid_interval_continues_compressed(ranks):
    first = ranks[0]["zoadam"]
    want, _ = simulate_zero_one_adam(first["flats0"], first["layouts"], 2, ZOADAM_STEPS, resume_at=8)
    for rank, out in enumerate(ranks):
        assert out["zoadam"]["resumed_variant"] == "sync"
        for g, x in out["zoadam"]["resumed"].items():
            assert_close(x, want[-1][rank][g], f"rank {rank} {g}")


def test_a_load_under_changed_policy_keys_warns_and_follows_the_config(ranks, save_dir):
    """The saved counters are checked against the loading config's schedule (at one rank: the error
    buffers restart sized for it)."""
    engine = initialize(Net(), make_config(1, optimizer=ZERO_ONE_ADAM), loss_fn=mse, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same config: no warning
        state = engine.load(f"{save_dir}/zoadam")
    assert engine._phases.switch.variant == "sync"
    changed = with_params(ZERO_ONE_ADAM, local_step_scaler=4)
    engine = initialize(Net(), make_config(1, optimizer=changed), loss_fn=mse, compile=False)
    with pytest.warns(UserWarning, match=r"policy counters .* = \(4, 0, 4, 0\) differ .* \(4, 0, 1, 3\)"):
        state = engine.load(f"{save_dir}/zoadam")
    # step 8 is the 4th frozen step: interval 1 under local_step_scaler 4 (a sync), counter 3
    assert int(state.opt_state.local_step_counter) == 3 and int(state.opt_state.local_step_interval) == 1
    assert all(t.numel() == 0 for t in state.opt_state.worker_error.values())


def test_onebit_lamb_two_ranks_equal_deepspeeds_equations(ranks):
    first = ranks[0]["lamb"]
    layouts, flats0 = first["layouts"], first["flats0"]
    want = simulate_onebit_lamb(flats0, layouts, 2, LAMB_STEPS)
    assert first["variants"] == ["warm-up", "warm-up", "first-compressed", "compressed", "compressed"]
    for rank, out in enumerate(ranks):
        for t in range(LAMB_STEPS):
            for g, x in out["lamb"]["history"][t].items():
                assert_close(x, want[t][g], f"rank {rank} step {t + 1} {g}")
    assert any("'mpi'" in w and "gloo" in w for w in first["warnings"])
    # resumed after the freeze: the frozen variance, ratios and factors come back, the errors restart
    want = simulate_onebit_lamb(flats0, layouts, 2, LAMB_STEPS, resume_at=LAMB_SAVE + 1)[-1]
    for out in ranks:
        assert out["lamb"]["resumed_variant"] == "compressed"
        for g, x in out["lamb"]["resumed"].items():
            assert_close(x, want[g], g)


# --- one process ------------------------------------------------------------------------------------


def with_params(block: dict, **changes) -> dict:
    return {"type": block["type"], "params": {**block["params"], **changes}}


def run_steps(block: dict, steps: int, compile: bool = False):
    engine = initialize(Net(), make_config(1, optimizer=block), loss_fn=mse, compile=compile)
    state = engine.init()
    flats0 = {g: t.clone() for g, t in state.master.items()}
    for batch in batches(1, steps):
        state = engine.step(state, batch)
    return engine, state, flats0


def test_warm_up_is_plain_lamb_and_adam_without_bias_correction():
    lamb = {
        "type": "Lamb",
        "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD, "bias_correction": False},
    }
    _, want, _ = run_steps(lamb, 3)
    _, got, _ = run_steps(with_params(ONEBIT_LAMB, freeze_step=10), 3)
    for g, x in got.master.items():
        torch.testing.assert_close(x, want.master[g], rtol=1e-6, atol=1e-7)
    # 0/1 Adam's variance steps are Adam without bias correction (1-bit Adam's warm-up)
    adam = with_params(
        {"type": "OneBitAdam", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD}},
        freeze_step=10,
    )
    _, want, _ = run_steps(adam, 3)
    _, got, _ = run_steps(with_params(ZERO_ONE_ADAM, var_freeze_step=10, var_update_scaler=16), 3)
    for g, x in got.master.items():
        torch.testing.assert_close(x, want.master[g], rtol=1e-6, atol=1e-7)


def test_world_size_1_runs_the_schedule_without_communicating():
    """At one rank the compressed average is the rank's own value: 0/1 Adam still runs its schedule
    (local steps and syncs; its onebit steps update m with the gradient, where DeepSpeed leaves m
    unchanged), 1-bit LAMB its frozen-ratio phase. 0/1 Adam compiled: its full steps, with their
    on-device counters, run in the compiled step (1-bit LAMB eagerly: a second compile costs 4 s)."""
    engine, state, flats0 = run_steps(ZERO_ONE_ADAM, ZOADAM_STEPS, compile=True)
    want, _ = simulate_zero_one_adam(flats0, layouts_of(engine), 1, ZOADAM_STEPS)
    for g, x in state.master.items():
        assert_close(x, want[-1][0][g], g)
    assert engine.comm.total_bytes == 0
    engine, state, flats0 = run_steps(ONEBIT_LAMB, LAMB_STEPS)
    want = simulate_onebit_lamb(flats0, layouts_of(engine), 1, LAMB_STEPS)
    for g, x in state.master.items():
        assert_close(x, want[-1][g], g)
    assert all(t.numel() == 0 for t in state.opt_state.worker_error.values())


def test_configs_with_every_key_parse_case_insensitively():
    for block, name in ((ZERO_ONE_ADAM, "zerooneadam"), (ONEBIT_LAMB, "onebitlamb")):
        for kind in (block["type"], block["type"].lower(), block["type"].upper()):
            c = Config.from_dict({"train_micro_batch_size_per_gpu": 1, "optimizer": {**block, "type": kind}})
            assert c.optimizer.type == name
        opt = zo.from_config(block)
        for key, value in block["params"].items():
            if key in opt.hyperparams:
                assert opt.hyperparams[key] == (tuple(value) if isinstance(value, list) else value), key
    with pytest.warns(UserWarning, match="cuda_aware = true has no effect"):
        zo.from_config(with_params(ONEBIT_LAMB, cuda_aware=True))


@pytest.mark.parametrize(
    "block, changes, match",
    [
        (ZERO_ONE_ADAM, {"var_freeze_step": -1}, "var_freeze_step: -1.0 is invalid"),
        (ZERO_ONE_ADAM, {"var_update_scaler": 0}, "var_update_scaler: 0.0 is invalid"),
        (ZERO_ONE_ADAM, {"local_step_clipper": 1.5}, "local_step_clipper: 1.5 is invalid"),
        (ZERO_ONE_ADAM, {"comm_backend_name": "gloo"}, "'gloo' is not a DeepSpeed comm backend"),
        (ZERO_ONE_ADAM, {"freeze_step": 3}, "unknown key"),
        (ONEBIT_LAMB, {"freeze_step": -2}, "freeze_step: -2.0 is invalid"),
        (ONEBIT_LAMB, {"comm_backend_name": "tcp"}, "'tcp' is not a DeepSpeed comm backend"),
        (ONEBIT_LAMB, {"factor_max": 0.1}, "factor_max: 0.1 is invalid"),
        (ONEBIT_LAMB, {"coeff_beta": 1.5}, "coeff_beta"),
        (ONEBIT_LAMB, {"amsgrad": True}, "amsgrad"),
    ],
)
def test_bad_config(block, changes, match):
    with pytest.raises(ConfigError, match=match):
        zo.from_config(with_params(block, **changes))


@pytest.mark.parametrize("block", [ZERO_ONE_ADAM, ONEBIT_LAMB])
def test_zero_stages_above_0_are_refused(block):
    with pytest.raises(ConfigError, match=f"{block['type'].lower()}' needs zero_optimization.stage 0"):
        initialize(Net(), make_config(1, stage=2, optimizer=block), loss_fn=mse, compile=False)


def test_fp16_overflow_skips_without_advancing_the_schedule():
    """An overflowed fp16 step writes nothing: 0/1 Adam's counters and variant stay, the next step
    runs the variant the skipped one would have (the schedule counts applied steps)."""
    engine = initialize(Net(), make_config(1, fp16=True, optimizer=ZERO_ONE_ADAM), loss_fn=mse, compile=False)
    state = engine.init()
    for batch in batches(1, 6):  # up to the sync of step 6; step 7 is local
        state = engine.step(state, batch)
    assert int(state.skipped_steps) == 0 and engine._phases.switch.variant == "local"
    before = {g: t.clone() for g, t in state.master.items()}
    counters = [float(t) for t in state.opt_state[4:9]]  # lrs and the policy counters
    x, y = batches(1, 7)[6]
    x = x.clone()
    x[0, 0] = float("inf")
    state = engine.step(state, (x, y))
    assert int(state.skipped_steps) == 1 and engine._phases.switch.variant == "local"
    assert all(torch.equal(state.master[g], t) for g, t in before.items())
    assert [float(t) for t in state.opt_state[4:9]] == counters
    state = engine.step(state, batches(1, 7)[6])
    assert float(state.opt_state.lrs) == pytest.approx(LR) and engine._phases.switch.variant == "sync"
