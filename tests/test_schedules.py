"""LR and momentum schedules against hand-computed values of DeepSpeed 0.19's formulas.

Every point is checked for a python int (float result) and a 0-d tensor (tensor result)."""

import math

import pytest
import torch
import torch._dynamo.testing

import zerostep.optim as zo
from zerostep.errors import ConfigError


def check(f, expected):
    for it, value in expected.items():
        assert f(it) == pytest.approx(value, rel=1e-9, abs=1e-15), it
        t = f(torch.tensor(it))
        assert isinstance(t, torch.Tensor) and t.shape == () and t.dtype == torch.float32
        assert t.item() == pytest.approx(value, rel=1e-6, abs=1e-12), it


def test_no_scheduler_is_the_base_lr():
    check(zo.lr_schedule(None, 0.1), {-1: 0.1, 0: 0.1, 1000: 0.1})


def test_warmup_lr_log_and_linear():
    f = zo.lr_schedule({"type": "WarmupLR", "params": {"warmup_min_lr": 0.01, "warmup_num_steps": 10}}, 0.5)
    log = lambda it: 0.01 + 0.49 * math.log(it + 1) / math.log(10)
    check(f, {-1: 0.01, 0: 0.01, 1: log(1), 8: log(8), 9: log(9), 10: 0.5, 500: 0.5})
    f = zo.lr_schedule({"type": "warmuplr", "params": {"warmup_num_steps": 1, "warmup_type": "linear",
                                                       "warmup_max_lr": 0.2}}, 0.5)
    # warmup_num_steps is raised to 2; warmup_max_lr overrides the optimizer's lr.
    check(f, {-1: 0.0, 0: 0.0, 1: 0.1, 2: 0.2, 3: 0.2})


def test_warmup_decay_lr():
    params = {"total_num_steps": 30, "warmup_num_steps": 10, "warmup_type": "linear"}
    f = zo.lr_schedule({"type": "WarmupDecayLR", "params": params}, 0.5)
    # warmup_max_lr defaults to 0.001 here, not to the optimizer's lr.
    check(f, {-1: 0.0, 0: 0.0, 5: 0.0005, 9: 0.0009, 10: 0.001, 20: 0.0005, 29: 0.00005, 30: 0.0, 40: 0.0})


def test_warmup_cosine_lr_and_its_end_clamp():
    params = {"total_num_steps": 20, "warmup_num_steps": 4, "warmup_min_ratio": 0.1, "cos_min_ratio": 0.01,
              "warmup_type": "linear"}
    f = zo.lr_schedule({"type": "WarmupCosineLR", "params": params}, 2.0)
    cos = lambda it: 2.0 * (0.01 + 0.99 * (1 + math.cos(math.pi * min(1, (it - 3) / 16))) / 2)
    check(f, {-1: 0.0, 0: 0.2, 2: 2.0 * (0.1 + 0.5 * 0.9), 3: 2.0 * (0.1 + 0.75 * 0.9), 4: cos(4),
              11: cos(11), 18: cos(18), 19: 0.02, 20: 0.02, 100: 0.02})


def test_one_cycle_lr_and_momentum():
    params = {"cycle_min_lr": 0.1, "cycle_max_lr": 1.0, "cycle_first_step_size": 4,
              "cycle_second_step_size": 6, "decay_lr_rate": 0.5, "decay_step_size": 2,
              "cycle_min_mom": 0.8, "cycle_max_mom": 0.9, "decay_mom_rate": 0.1}
    block = {"type": "OneCycle", "params": params}
    f = zo.lr_schedule(block, 123.0)
    # rising over (it + 1) in [0, 4], falling over [4, 10], then (it >= 10) min / (1 + rate * (it - 9) / 2).
    check(f, {-1: 0.1, 0: 0.1 + 0.9 * 0.25, 2: 0.1 + 0.9 * 0.75, 3: 1.0, 4: 0.1 + 0.9 * 5 / 6,
              8: 0.1 + 0.9 / 6, 9: 0.1, 10: 0.1 / 1.25, 13: 0.1 / 2.0})
    m = zo.momentum_schedule(block)
    # construction sets cycle_min_mom; then max - (max - min) * scale; after: max * (1 + rate * (it - 9) / 2).
    check(m, {-1: 0.8, 0: 0.9 - 0.1 * 0.25, 3: 0.8, 8: 0.9 - 0.1 / 6, 9: 0.9, 10: 0.9 * 1.05, 13: 0.9 * 1.2})
    assert zo.momentum_schedule({"type": "OneCycle", "params": {**params, "cycle_momentum": False}}) is None
    assert zo.momentum_schedule({"type": "WarmupLR"}) is None
    assert zo.momentum_schedule(block, zo.sgd()) is None  # SGD has no betas: DeepSpeed skips the cycle
    assert zo.momentum_schedule(block, zo.adam()) is not None


def test_one_cycle_without_decay_holds_the_minimum_and_stairs_quantise():
    f = zo.lr_schedule({"type": "OneCycle", "params": {"cycle_min_lr": 0.0, "cycle_max_lr": 1.0,
                                                       "cycle_first_step_size": 4}}, 1.0)
    check(f, {7: 0.0, 8: 0.0, 50: 0.0})
    f = zo.lr_schedule({"type": "OneCycle", "params": {"cycle_min_lr": 0.0, "cycle_max_lr": 1.0,
                                                       "cycle_first_step_size": 4,
                                                       "cycle_first_stair_count": 2}}, 1.0)
    # two stairs per half: floor(offset * 2 / 4) / 2
    check(f, {-1: 0.0, 0: 0.0, 1: 0.5, 2: 0.5, 3: 1.0, 4: 0.5, 5: 0.5, 6: 0.0})


def test_lr_range_test():
    params = {"lr_range_test_min_lr": 0.01, "lr_range_test_step_size": 4, "lr_range_test_step_rate": 2.0}
    check(zo.lr_schedule({"type": "LRRangeTest", "params": params}, 1.0),
          {-1: 0.01, 0: 0.01 * 1.5, 3: 0.03, 10: 0.01 * (1 + 2 * 11 / 4)})
    params["lr_range_test_staircase"] = True
    f = zo.lr_schedule({"type": "lrrangetest", "params": params}, 1.0)
    check(f, {-1: 0.01, 2: 0.01, 3: 0.03, 10: 0.05})


def test_tensor_steps_trace_without_recompiling():
    block = {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10}}
    f = zo.lr_schedule(block, 1.0)
    counter = torch._dynamo.testing.CompileCounter()
    g = torch.compile(f, fullgraph=True, backend=counter)
    torch._dynamo.reset()
    for it in (0, 5, 50, 200):
        assert g(torch.tensor(it)).item() == pytest.approx(f(it), rel=1e-6)
    assert counter.frame_count == 1


@pytest.mark.parametrize("block", [
    {"type": "Cyclic"},
    {"type": "WarmupDecayLR", "params": {}},
    {"type": "OneCycle", "params": {"cycle_min_lr": 0.1}},
    {"type": "WarmupLR", "params": {"warmup_num_steps": 0}},
    {"type": "WarmupLR", "params": {"warmup_num_steps": 10.5}},
    {"type": "WarmupLR", "params": {"warmup_type": "cosine"}},
    {"type": "WarmupLR", "params": {"warmup_max": 0.1}},
    {"type": "WarmupLR", "params": {"last_batch_iteration": 5}},
    {"type": "LRRangeTest", "params": {"lr_range_test_min_lr": "x"}},
])
def test_bad_scheduler_blocks_raise_config_error(block):
    with pytest.raises(ConfigError):
        zo.lr_schedule(block, 0.1)
