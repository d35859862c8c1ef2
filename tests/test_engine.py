"""The one-process engine against a plain PyTorch loop, precision and skip semantics, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from zerostep.core import (
    Config,
    ConfigError,
    ConsumedStateError,
    LossScaleError,
    TrainState,
    initialize,
)


def make_mlp(sizes=(6, 12, 1), seed=0) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def config(mb=4, gas=1, clip=1.0, lr=1e-2, wd=0.01, stage=0, **extra) -> Config:
    d = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": wd, "betas": [0.9, 0.99]}},
    }
    d.update(extra)
    return Config.from_dict(d, world_size=1)


def batches(n, rows, d_in=6, d_out=1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(rows, d_in, generator=gen), torch.randn(rows, d_out, generator=gen)) for _ in range(n)
    ]


def torch_reference(model, data, lr=1e-2, wd=0.01, clip=1.0, gas=1):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.99))
    losses = []
    for x, y in data:
        opt.zero_grad()
        total = 0.0
        for xm, ym in zip(x.chunk(gas), y.chunk(gas)):
            loss = mse(model, (xm, ym)) / gas
            loss.backward()
            total += float(loss)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(total)
    return losses


def assert_params_close(engine, state, model, rtol=1e-5):
    got = engine.full_params(state)
    for name, p in model.named_parameters():
        err = (got[name] - p.detach()).abs().max() / p.detach().abs().max().clamp_min(1e-12)
        assert err <= rtol, f"{name}: relative error {float(err):.2e}"


@pytest.mark.parametrize("compile", [False, True])
def test_equals_pytorch_loop(compile):
    gas, mb, steps = 2, 4, 8
    data = batches(steps, gas * mb)
    engine = initialize(make_mlp(), config(mb=mb, gas=gas, clip=0.5), loss_fn=mse, compile=compile)
    state = engine.init()
    losses = []
    for b in data:
        state = engine.step(state, b)
        losses.append(float(state.metrics.loss))
    ref = make_mlp()
    ref_losses = torch_reference(ref, data, clip=0.5, gas=gas)
    assert_params_close(engine, state, ref)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert int(state.step) == steps
    assert int(state.metrics.skipped) == 0


@given(
    hidden=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    mb=st.integers(1, 4),
    gas=st.integers(1, 3),
    clip=st.sampled_from([0.0, 0.05, 1.0, 100.0]),
)
def test_equals_pytorch_loop_over_shapes(hidden, mb, gas, clip):
    sizes = (5, *hidden, 2)
    data = batches(3, mb * gas, d_in=5, d_out=2, seed=len(hidden))
    engine = initialize(make_mlp(sizes), config(mb=mb, gas=gas, clip=clip), loss_fn=mse, compile=False)
    state = engine.init()
    for b in data:
        state = engine.step(state, b)
    ref = make_mlp(sizes)
    torch_reference(ref, data, clip=clip, gas=gas)
    assert_params_close(engine, state, ref, rtol=2e-5)


def test_accumulation_equals_one_big_batch():
    data = batches(4, 8)
    results = []
    for mb, gas in [(8, 1), (4, 2), (2, 4), (1, 8)]:
        engine = initialize(make_mlp(), config(mb=mb, gas=gas), loss_fn=mse, compile=False)
        state = engine.init()
        for b in data:
            state = engine.step(state, b)
        results.append(engine.full_params(state))
    for other in results[1:]:
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_inf_in_batch_skips_the_update(precision):
    extra = {"fp16": {"enabled": True, "initial_scale_power": 8}} if precision == "fp16" else {}
    if precision == "bf16":
        extra = {"bf16": {"enabled": True}}
    engine = initialize(make_mlp(), config(**extra), loss_fn=mse, compile=False)
    state = engine.init()
    state = engine.step(state, batches(1, 4)[0])
    before = {n: t.clone() for n, t in engine.full_params(state).items()}
    opt_before = [t.clone() for t in _tensors(state.opt_state)]
    scale_before = float(state.scaler.scale)
    x, y = batches(1, 4, seed=5)[0]
    x[1, 2] = float("inf")
    state = engine.step(state, (x, y))
    assert int(state.metrics.skipped) == 1
    assert int(state.step) == 2 and int(state.skipped_steps) == 1
    assert not math.isfinite(float(state.metrics.grad_norm))
    after = engine.full_params(state)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(a, b) for a, b in zip(opt_before, _tensors(state.opt_state)))
    if precision == "fp16":
        # hysteresis 2: the first overflow spends hysteresis, the scale stays
        assert float(state.scaler.scale) == scale_before
        assert int(state.scaler.hysteresis_left) == 1
    state = engine.step(state, batches(1, 4, seed=6)[0])
    assert int(state.metrics.skipped) == 0


def _tensors(tree):
    import optree

    return [t for t in optree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def test_bf16_and_fp16_train_close_to_fp32():
    data = batches(6, 8)
    finals = {}
    for name, extra in [
        ("fp32", {}),
        ("bf16", {"bf16": {"enabled": True}}),
        ("fp16", {"fp16": {"enabled": True, "initial_scale_power": 10}}),
    ]:
        engine = initialize(make_mlp(), config(mb=8, **extra), loss_fn=mse, compile=False)
        state = engine.init()
        for b in data:
            state = engine.step(state, b)
        finals[name] = engine.full_params(state)
        assert all(p.dtype == torch.float32 for p in finals[name].values())
        assert state.params.flats[next(iter(state.params.flats))].dtype == engine.compute_dtype
    for name in ("bf16", "fp16"):
        for p in finals["fp32"]:
            torch.testing.assert_close(finals[name][p], finals["fp32"][p], rtol=0.05, atol=0.02)


def test_loss_scale_error_at_minimum_keeps_state_valid():
    cfg = config(fp16={"enabled": True, "initial_scale_power": 0, "hysteresis": 1, "min_loss_scale": 1})
    engine = initialize(make_mlp(), cfg, loss_fn=mse, compile=False)
    state = engine.init()
    x, y = batches(1, 4)[0]
    x[0, 0] = float("nan")
    with pytest.raises(LossScaleError, match="min_loss_scale"):
        engine.step(state, (x, y))
    # The state passed in was not consumed and still trains.
    state = engine.step(state, batches(1, 4, seed=3)[0])
    assert int(state.step) == 1 and int(state.metrics.skipped) == 0


def test_schedule_advances_only_on_applied_steps():
    cfg = config(
        scheduler={
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": 0.01,
                "warmup_num_steps": 10,
                "warmup_type": "linear",
            },
        }
    )
    engine = initialize(make_mlp(), cfg, loss_fn=mse, compile=False)
    state = engine.init()
    lrs = []
    for i, (x, y) in enumerate(batches(5, 4)):
        if i == 2:
            x = x.clone()
            x[0, 0] = float("inf")
        state = engine.step(state, (x, y))
        lrs.append(float(state.metrics.lr))
    # update k uses f(k - 1) with f(it) = 0.01 * it / 10 (f(-1) = 0); the skipped step (i=2) would
    # have used f(1) and does not advance the schedule, so i=3 uses f(1) again.
    assert lrs == pytest.approx([0.0, 0.0, 0.001, 0.001, 0.002], abs=1e-9)


def test_consumed_state_is_rejected():
    engine = initialize(make_mlp(), config(), loss_fn=mse, compile=False)
    state = engine.init()
    new = engine.step(state, batches(1, 4)[0])
    with pytest.raises(ConsumedStateError, match="already passed to engine.step"):
        engine.step(state, batches(1, 4)[0])
    with pytest.raises(ConsumedStateError):
        engine.full_params(state)
    assert isinstance(new, TrainState)


def test_equal_states_and_batches_give_equal_states():
    outs = []
    for _ in range(2):
        engine = initialize(make_mlp(), config(), loss_fn=mse, compile=False)
        state = engine.init(seed=3)
        for b in batches(3, 4):
            state = engine.step(state, b)
        outs.append(engine.full_params(state))
    assert all(torch.equal(outs[0][n], outs[1][n]) for n in outs[0])


def test_params_mapping_and_eval_step():
    model = make_mlp()
    engine = initialize(model, config(), loss_fn=mse, compile=False)
    state = engine.init()
    assert set(state.params) == {n for n, _ in model.named_parameters()}
    torch.testing.assert_close(state.params["0.weight"], model[0].weight.detach())
    x, y = batches(1, 10)[0]  # eval takes any batch size
    assert float(engine.eval_step(state, (x, y))) == pytest.approx(float(mse(model, (x, y))), rel=1e-6)


def test_default_loss_calls_model_and_takes_dot_loss():
    class HFLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x, labels):
            class Out:
                pass

            out = Out()
            out.loss = F.mse_loss(self.lin(x), labels)
            return out

    engine = initialize(HFLike(), config(mb=2), compile=False)
    state = engine.step(engine.init(), {"x": torch.randn(2, 3), "labels": torch.randn(2, 1)})
    assert math.isfinite(float(state.metrics.loss))


def test_bad_inputs_have_clear_errors(tmp_path):
    frozen = make_mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        initialize(frozen, config(), loss_fn=mse, compile=False)

    engine = initialize(make_mlp(), config(mb=4, gas=2), loss_fn=mse, compile=False)
    state = engine.init()
    with pytest.raises(ValueError, match=r"4 x 2 = 8"):
        engine.step(state, batches(1, 6)[0])

    bad = initialize(make_mlp(), config(), loss_fn=lambda m, b: m(b[0]), compile=False)
    with pytest.raises(ValueError, match="scalar"):
        bad.step(bad.init(), batches(1, 4)[0])

    with pytest.raises(ConfigError, match="does-not-exist.json"):
        initialize(make_mlp(), str(tmp_path / "does-not-exist.json"), loss_fn=mse)


def test_lamb_trust_ratio_is_per_parameter_over_flat_buffers():
    """The engine's flat LAMB equals LAMB over the unflattened parameters (one trust ratio each)."""
    from zerostep import optim

    block = {"type": "Lamb", "params": {"lr": 0.05, "weight_decay": 0.01}}
    cfg = config(clip=0.0, optimizer=block)
    engine = initialize(make_mlp(), cfg, loss_fn=mse, compile=False)
    state = engine.init()
    data = batches(4, 4)
    for b in data:
        state = engine.step(state, b)
    ref = make_mlp()
    params = {n: p.detach().clone() for n, p in ref.named_parameters()}
    opt = optim.from_config(block)
    opt_state = opt.init(params)

    def loss_at(p, b):
        return mse(lambda x: torch.func.functional_call(ref, p, (x,)), b)

    for b in data:
        grads = torch.func.grad(loss_at)(params, b)
        params, opt_state = opt.update(grads, opt_state, params)
    got = engine.full_params(state)
    for n, p in params.items():
        torch.testing.assert_close(got[n], p, rtol=1e-5, atol=1e-6)


def test_dropout_follows_the_state_seed():
    def run(seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 1))
        engine = initialize(model, config(), loss_fn=mse, compile=False)
        state = engine.init(seed=seed)
        torch.manual_seed(1234 + seed)  # the global RNG's state must not matter
        for b in batches(3, 4):
            state = engine.step(state, b)
        return engine.full_params(state)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_frozen_parameters_are_constants_in_the_compute_dtype():
    model = make_mlp((6, 8, 8, 1))
    for p in model[0].parameters():
        p.requires_grad_(False)
    engine = initialize(model, config(bf16={"enabled": True}), loss_fn=mse, compile=False)
    state = engine.step(engine.init(), batches(1, 4)[0])
    assert set(state.params) == {"2.weight", "2.bias", "4.weight", "4.bias"}
    assert math.isfinite(float(state.metrics.loss))


class WithUnusedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.blocks[0](x)))  # blocks[1] is never used


def test_a_block_the_forward_never_uses_gets_zero_gradients():
    engine = initialize(WithUnusedBlock(), config(wd=0.0), loss_fn=mse, compile=False)
    before = engine.full_params(engine.init())
    state = engine.init()
    for b in batches(2, 4):
        state = engine.step(state, b)
    after = engine.full_params(state)
    assert torch.equal(after["blocks.1.weight"], before["blocks.1.weight"])
    assert not torch.equal(after["blocks.0.weight"], before["blocks.0.weight"])


def test_a_step_that_raises_midway_leaves_no_partial_gradients():
    calls = {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        if calls["n"] == 2:  # second micro-batch of the first step
            raise RuntimeError("data error")
        return mse(model, batch)

    engine = initialize(make_mlp(), config(mb=2, gas=2), loss_fn=flaky, compile=False)
    state = engine.init()
    with pytest.raises(RuntimeError, match="data error"):
        engine.step(state, batches(1, 4)[0])
    state = engine.step(state, batches(1, 4)[0])  # the raising step consumed nothing

    clean = initialize(make_mlp(), config(mb=2, gas=2), loss_fn=mse, compile=False)
    ref = clean.step(clean.init(), batches(1, 4)[0])
    got, want = engine.full_params(state), clean.full_params(ref)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_step_leaves_the_global_rng_alone_and_eval_turns_dropout_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 1))
    engine = initialize(model, config(), loss_fn=mse, compile=False)
    state = engine.init()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    state = engine.step(state, batches(1, 4)[0])
    assert torch.equal(torch.rand(3), expected)
    x, y = batches(1, 8)[0]
    assert float(engine.eval_step(state, (x, y))) == float(engine.eval_step(state, (x, y)))
    assert model.training


def test_the_cuda_generator_seeded_is_the_models_not_the_current_one(monkeypatch):
    # No GPU here: the engine is told its model sits on cuda:1 while the current device is 0.
    engine = initialize(make_mlp(), config(), loss_fn=mse, compile=False)
    engine.device = torch.device("cuda", 1)
    generators = (torch.Generator(), torch.Generator())
    for g in generators:
        g.manual_seed(5)
    monkeypatch.setattr(torch.cuda, "default_generators", generators, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert engine._rng_devices == [1]  # what fork_rng saves and restores
    engine._seed_rng(123)
    assert generators[1].initial_seed() == 123 and generators[0].initial_seed() == 5


def test_overlap_comm_defaults_per_backend():
    from zerostep.core.engine import default_overlap_comm

    table = {
        (stage, backend, shm): default_overlap_comm(stage, backend, shm)
        for stage in range(4)
        for backend in ("gloo", "nccl")
        for shm in (False, True)
    }
    on = {key for key, overlap in table.items() if overlap}
    assert on == {(0, "gloo", False)}  # measured faster there; NCCL follows DeepSpeed (off)
    assert default_overlap_comm(0, None, False) is False  # one process


def test_a_failure_after_the_first_write_consumes_the_state_and_one_before_leaves_it_valid(monkeypatch):
    import zerostep.core.engine as engine_module

    engine = initialize(make_mlp(), config(), loss_fn=mse, compile=False)
    data = batches(2, 4)
    state = engine.init()
    # Before any write (as fp16.loss_scale_window=1e30 raised once the update had been applied): the
    # state stays valid and a retry applies the update once.
    real = engine_module.loss_scale_update

    def overflow(*args):
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(engine_module, "loss_scale_update", overflow)
    with pytest.raises(OverflowError):
        engine.step(state, data[0])
    monkeypatch.setattr(engine_module, "loss_scale_update", real)
    state = engine.step(state, data[0])
    clean = initialize(make_mlp(), config(), loss_fn=mse, compile=False)
    want = clean.full_params(clean.step(clean.init(), data[0]))
    got = engine.full_params(state)
    assert all(torch.equal(got[n], want[n]) for n in want)
    # After the first in-place write: the state is consumed, saying why, so a retry cannot apply twice.
    update = engine.optimizer.update_

    def update_then_fail(*args, **kwargs):
        update(*args, **kwargs)
        raise RuntimeError("device lost mid-update")

    object.__setattr__(engine.optimizer, "update_", update_then_fail)  # a frozen dataclass
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step(state, data[1])
    object.__setattr__(engine.optimizer, "update_", update)
    with pytest.raises(ConsumedStateError, match=r"raised \(RuntimeError: device lost.*half updated"):
        engine.step(state, data[1])


def test_a_compiled_step_says_in_one_line_what_differs_in_a_bad_batch():
    engine = initialize(make_mlp(), config(), loss_fn=mse)  # compiled
    x, y = batches(1, 4)[0]
    state = engine.step(engine.init(), (x, y))
    with pytest.raises(
        ValueError, match=r"leaf '0' has shape \(4, 7\); the first step's had \(4, 6\)"
    ) as info:
        engine.step(state, (torch.randn(4, 7), y))  # a wrong feature size fails inside dynamo's tracing
    assert info.value.__cause__ is None and len(str(info.value).splitlines()) == 1
    with pytest.raises(ValueError, match=r"leaf '0' has shape \(4, 6\) and dtype int64; the first step's"):
        engine.step(state, (x.long(), y))
    with pytest.raises(ValueError, match="not like the first step's: its structure is"):
        engine.step(state, [x, y])
    state = engine.step(state, (x, y))  # every refused batch left the state valid
    assert int(state.step) == 2
