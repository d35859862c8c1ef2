"""Reducers accumulate micro-batches (flat or per-parameter gradients) and start clean each step.

The collective paths (all-reduce, reduce-scatter, overlapped hooks) run on real ranks in
tests/test_zero.py; here is what one process can check."""

import pytest
import torch

from zerostep.core.reducers import Reducer


def test_accumulates_flat_and_per_parameter_gradients():
    r = Reducer()
    r.add({"a": torch.ones(3), "b": [torch.ones(2, 2), torch.zeros(1)]}, last=False)
    r.add({"a": torch.full((3,), 2.0), "b": [torch.ones(2, 2), torch.ones(1)]}, last=True)
    out = r.result()
    assert torch.equal(out["a"], torch.full((3,), 3.0))
    assert torch.equal(out["b"][0], torch.full((2, 2), 2.0)) and torch.equal(out["b"][1], torch.ones(1))
    assert r.result() is None  # result hands the sum over once


def test_reset_drops_a_partial_sum():
    r = Reducer()
    r.add({"a": torch.ones(3)}, last=False)
    r.reset()
    r.add({"a": torch.ones(3)}, last=True)
    assert torch.equal(r.result()["a"], torch.ones(3))
    assert r.grad_hooks(last=True) is None


def test_bf16_gradients_sum_in_the_accumulation_dtype():
    # 1 + 2**-8 is a tie that bf16 rounds back to 1, every time; fp32 keeps the small terms
    small = [torch.full((2,), 2.0**-8, dtype=torch.bfloat16)] * 2
    first = torch.ones(2, dtype=torch.bfloat16)
    for dtype, want in ((torch.float32, 1 + 2.0**-7), (None, 1.0)):
        r = Reducer(dtype)
        r.add({"a": first.clone()}, last=False)
        for i, g in enumerate(small):
            r.add({"a": g.clone()}, last=i == len(small) - 1)
        out = r.result()["a"]
        assert out.dtype == (dtype or torch.bfloat16)
        assert torch.equal(out.float(), torch.full((2,), want))
    # one micro-batch: its gradient is the sum, left in its own dtype (no copy)
    r = Reducer(torch.float32)
    r.add({"a": first}, last=True)
    assert r.result()["a"] is first


def test_grad_accum_dtype_follows_deepspeed():
    from zerostep.core.reducers import grad_accum_dtype_of
    from zerostep.errors import ConfigError

    assert grad_accum_dtype_of(None, torch.bfloat16) == torch.bfloat16  # DeepSpeed 0.19: the model's
    assert grad_accum_dtype_of("fp32", torch.bfloat16) == torch.float32
    assert grad_accum_dtype_of("fp16", torch.float16) == torch.float16
    for name, compute in (("fp16", torch.bfloat16), ("bf16", torch.float32), ("bf16", torch.float16)):
        with pytest.raises(ConfigError, match="data_types.grad_accum_dtype"):
            grad_accum_dtype_of(name, compute)
