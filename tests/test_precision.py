"""The loss scaler reproduces DeepSpeed's ZeRO DynamicLossScaler step for step."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zerostep.core.precision import compute_dtype_of, loss_scale_init, loss_scale_update


def fp16_block(**kw):
    base = dict(
        enabled=True,
        loss_scale=0,
        initial_scale_power=16,
        loss_scale_window=1000,
        hysteresis=2,
        consecutive_hysteresis=False,
        min_loss_scale=1,
    )
    base.update(kw)
    return SimpleNamespace(**base)


class DeepSpeedScaler:
    """DeepSpeed 0.19's DynamicLossScaler.update_scale (ZeRO path), transcribed from its semantics."""

    def __init__(self, cfg):
        self.scale = 2.0**cfg.initial_scale_power
        self.it, self.last, self.left = 0, -1, cfg.hysteresis
        self.cfg = cfg
        self.raised = 0

    def update(self, overflow):
        c = self.cfg
        if overflow:
            if c.hysteresis == 1 or self.left == 1:
                if self.scale == c.min_loss_scale:
                    self.raised += 1
                else:
                    self.scale = max(self.scale / 2, c.min_loss_scale)
            else:
                self.left -= 1
            self.last = self.it
        else:
            if c.consecutive_hysteresis:
                self.left = c.hysteresis
            stable = self.it - self.last - 1
            if stable > 0 and stable % c.loss_scale_window == 0:
                if not c.consecutive_hysteresis:
                    self.left = c.hysteresis
                self.scale *= 2
        self.it += 1


def run(cfg, overflows):
    state, scales = loss_scale_init(cfg), []
    for o in overflows:
        state = loss_scale_update(state, o, cfg)
        scales.append(float(state.scale))
    return state, scales


def test_reference_example():
    cfg = fp16_block(initial_scale_power=4, loss_scale_window=2, hysteresis=2, min_loss_scale=1)
    flags = [True, True, False, False, False, False, False, True, False, True, True]
    _, scales = run(cfg, flags)
    assert scales == [16, 8, 8, 8, 16, 16, 32, 32, 32, 16, 8]


@given(
    flags=st.lists(st.booleans(), max_size=60),
    power=st.integers(0, 6),
    window=st.integers(1, 5),
    hysteresis=st.integers(1, 4),
    consecutive=st.booleans(),
    min_scale=st.sampled_from([1, 2, 4]),
)
def test_matches_deepspeed_rule(flags, power, window, hysteresis, consecutive, min_scale):
    cfg = fp16_block(
        initial_scale_power=max(power, 2),
        loss_scale_window=window,
        hysteresis=hysteresis,
        consecutive_hysteresis=consecutive,
        min_loss_scale=min_scale,
    )
    ref = DeepSpeedScaler(cfg)
    state = loss_scale_init(cfg)
    for f in flags:
        ref.update(f)
        state = loss_scale_update(state, f, cfg)
        assert float(state.scale) == ref.scale
        assert int(state.hysteresis_left) == ref.left
        assert int(state.last_overflow_iter) == ref.last
        assert int(state.min_scale_overflows) == ref.raised
    assert int(state.iteration) == len(flags)


def test_update_is_pure():
    cfg = fp16_block()
    state = loss_scale_init(cfg)
    before = [t.clone() for t in state]
    loss_scale_update(state, True, cfg)
    loss_scale_update(state, torch.tensor(False), cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, state))


def test_static_and_disabled_scales_never_change():
    static = fp16_block(loss_scale=128.0)
    _, scales = run(static, [True, False, True, True])
    assert scales == [128.0] * 4
    off = SimpleNamespace(enabled=False)
    _, scales = run(off, [True, False])
    assert scales == [1.0, 1.0]


def test_min_scale_overflow_is_counted():
    cfg = fp16_block(initial_scale_power=1, hysteresis=1, min_loss_scale=1)
    state, scales = run(cfg, [True, True, True])
    assert scales == [1.0, 1.0, 1.0]
    assert int(state.min_scale_overflows) == 2


@pytest.mark.parametrize(
    "fp16,bf16,dtype",
    [(False, False, torch.float32), (True, False, torch.float16), (False, True, torch.bfloat16)],
)
def test_compute_dtype(fp16, bf16, dtype):
    cfg = SimpleNamespace(fp16=SimpleNamespace(enabled=fp16), bf16=SimpleNamespace(enabled=bf16))
    assert compute_dtype_of(cfg) == dtype
