"""The one-region step (core/one_region.py): equal to the split step, skips on the device, host reads
per step counted, which configs qualify, and the fallback when the region does not compile."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zerostep.core import Config, initialize
from zerostep.core.one_region import reason_not_to_fuse

SCHEDULE = {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-2, "warmup_num_steps": 4}}


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def config(gas: int = 1, scheduler: dict | None = None, **extra) -> Config:
    d = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.5,  # active: the norms here are above it
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        **extra,
    }
    if scheduler is not None:
        d["scheduler"] = scheduler
    return Config.from_dict(d, world_size=1)


def data(steps: int, gas: int, poison: int | None = None):
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(steps):
        x, y = torch.randn(4 * gas, 6, generator=gen), torch.randn(4 * gas, 1, generator=gen)
        if i == poison:
            x[0, 0] = float("inf")  # non-finite gradients: the step is skipped
        out.append((x, y))
    return out


@contextlib.contextmanager
def counting_host_reads(exempt: list[torch.Tensor]):
    """Counts every read of a tensor's value on the host (``item``, ``tolist``, ``bool``/``int``/
    ``float``/``index``, ``numpy``, ``cpu``) except of the tensors in ``exempt``: on CUDA each is a
    device synchronisation, the CPU's equivalent of ``torch.cuda.set_sync_debug_mode``."""
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"]
    originals = {n: getattr(torch.Tensor, n) for n in names}
    exempt_ids = {id(t) for t in exempt}
    reads: list[str] = []

    def wrap(name, original):
        def read(self, *args, **kwargs):
            if id(self) not in exempt_ids:
                reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for n, f in originals.items():
        setattr(torch.Tensor, n, wrap(n, f))
    try:
        yield reads
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


def host_counters(state, split: bool) -> list[torch.Tensor]:
    """The state's host-side counters: the step and the seed always; the skip count and the scaler
    too on the split step, which updates them from its host-read flag."""
    counters = [state.step, state.seed]
    return counters + [state.skipped_steps, *state.scaler] if split else counters


def run(engine, batches, count_from: int | None = None):
    state, reads = engine.init(), []
    for i, batch in enumerate(batches):
        if count_from is not None and i >= count_from:
            with counting_host_reads(host_counters(state, engine._one_region is None)) as step_reads:
                state = engine.step(state, batch)
            reads.append(len(step_reads))
        else:
            state = engine.step(state, batch)
    return state, reads


@pytest.mark.parametrize("gas", [2])
def test_one_region_equals_the_split_step_with_a_skipped_step_and_a_schedule(gas):
    batches = data(5, gas, poison=2)
    fused = initialize(make_mlp(), config(gas, SCHEDULE), loss_fn=mse)
    split = initialize(make_mlp(), config(gas, SCHEDULE), loss_fn=mse, compile=False)  # the split step
    assert fused._one_region is not None and split._one_region is None
    a, reads_fused = run(fused, batches, count_from=3)
    b, reads_split = run(split, batches, count_from=3)
    assert int(a.step) == int(b.step) == 5 and int(a.skipped_steps) == int(b.skipped_steps) == 1
    for g in b.master:
        torch.testing.assert_close(a.master[g], b.master[g], rtol=1e-6, atol=1e-7)
    for field in ("loss", "grad_norm", "lr"):
        torch.testing.assert_close(getattr(a.metrics, field), getattr(b.metrics, field), rtol=1e-6, atol=0)
    # the schedule counts applied steps only: the next step's lr needs last step's flag, one read
    assert reads_fused == [1, 1]
    assert reads_split == [1, 1]  # the finite flag, between graph A and graph B


def test_a_skipped_step_leaves_every_buffer_as_it_was_and_a_constant_lr_reads_nothing():
    engine = initialize(make_mlp(), config(), loss_fn=mse)
    assert reason_not_to_fuse(engine) is None
    clean, poisoned = data(3, 1, poison=1)[:2]
    state = engine.step(engine.init(), clean)
    before = [t.clone() for t in [*state.master.values(), *state.opt_state.exp_avg.values()]]
    with counting_host_reads(host_counters(state, split=False)) as reads:
        state = engine.step(state, poisoned)
    assert reads == []  # constant lr: the engine never asks whether the step was applied
    after = [*state.master.values(), *state.opt_state.exp_avg.values()]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert int(state.metrics.skipped) == 1 and int(state.skipped_steps) == 1
    assert not torch.isfinite(state.metrics.grad_norm)
    state = engine.step(state, clean)  # and the next step applies again
    assert int(state.metrics.skipped) == 0 and int(state.step) == 3


def test_which_configs_run_as_one_region():
    def why(**extra):
        return reason_not_to_fuse(initialize(make_mlp(), config(**extra), loss_fn=mse))

    assert why() is None
    assert why(bf16={"enabled": True}) is None
    assert why(zero_optimization={"stage": 2}) is None
    assert why(zero_optimization={"stage": 3}) == "ZeRO stage 3"
    assert why(fp16={"enabled": True}) == "dynamic fp16 loss scaling"
    assert why(fp16={"enabled": True, "loss_scale": 128}) is None
    assert why(wall_clock_breakdown=True) == "wall_clock_breakdown"
    assert why(gradient_accumulation_steps=8, train_batch_size=32) == "over 4 micro-batches"
    eager = initialize(make_mlp(), config(), loss_fn=mse, compile=False)
    assert reason_not_to_fuse(eager) == "the forward is not compiled" and eager._one_region is None


def breaking_mse(model, batch):
    out = model(batch[0])
    torch._dynamo.graph_break()  # the split step's forward graph may break; one region may not
    return F.mse_loss(out, batch[1])


def test_a_model_the_region_cannot_compile_falls_back_to_the_split_step():
    engine = initialize(make_mlp(), config(), loss_fn=breaking_mse)
    reference = initialize(make_mlp(), config(), loss_fn=breaking_mse, compile=False)
    batches = data(2, 1)
    with pytest.warns(UserWarning, match="one-region compiled step failed on its first call"):
        state = engine.step(engine.init(), batches[0])
    assert engine._one_region is None
    state = engine.step(state, batches[1])
    expected, _ = run(reference, batches)
    for g in expected.master:
        torch.testing.assert_close(state.master[g], expected.master[g], rtol=1e-6, atol=1e-7)
