"""Reducers accumulate micro-batches (flat or per-parameter gradients) and start clean each step.

The collective paths (all-reduce, reduce-scatter, overlapped hooks) run on real ranks in
tests/test_zero.py; here is what one process can check."""

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
