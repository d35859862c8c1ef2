"""Activation checkpointing (core/activation_checkpointing.py, zerostep.checkpointing, the config block):
training with it equals training without (fp32, dropout on) at stages 0-3 on 1 and 2 gloo ranks, eager,
compiled and through the facade, while autograd keeps several times fewer activation bytes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import Net, mse
from torch import nn

import zerostep
import zerostep.checkpointing as ckpt
from zerostep.core import Config, ConfigError, initialize
from zerostep.core import activation_checkpointing as ac
from zerostep.core.config import ConfigWarning
from zerostep.core.gpt import GPT, GPTConfig
from zerostep.parallel.launch import spawn_ranks

MB, GAS, STEPS = 2, 2, 2
TINY = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.2)


@pytest.fixture(autouse=True)
def fresh_settings():
    """zerostep.checkpointing's settings are process-wide (as DeepSpeed's): each test starts unset."""
    saved = copy.copy(ac.CONFIGURED)
    ac.CONFIGURED.settings, ac.CONFIGURED.mpu = None, None
    ac.RNG_TRACKER.reset()
    yield
    ac.CONFIGURED.settings, ac.CONFIGURED.mpu = saved.settings, saved.mpu
    ac.RNG_TRACKER.reset()


def parse(block, **top):
    return Config.from_dict({"train_micro_batch_size_per_gpu": 1, "activation_checkpointing": block, **top})


# --- the config block ------------------------------------------------------------------------------


def test_block_parses_with_deepspeed_keys_and_round_trips():
    with pytest.warns(ConfigWarning) as caught:
        config = parse(
            {
                "partition_activations": True,
                "contiguous_memory_optimization": True,
                "number_checkpoints": 4,
                "cpu_checkpointing": True,
                "synchronize_checkpoint_boundary": True,
                "profile": True,
                "checkpoint_units": True,
            }
        )
    messages = " ".join(str(w.message) for w in caught)
    for key in ("partition_activations", "contiguous_memory_optimization", "number_checkpoints"):
        assert f"activation_checkpointing.{key}" in messages and "no effect" in messages
    block = config.activation_checkpointing
    assert (
        block.cpu_checkpointing and block.profile and block.checkpoint_units and block.number_checkpoints == 4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        assert Config.from_dict(config.to_dict()) == config
    assert parse({}).activation_checkpointing == ac.ActivationCheckpointingConfig()


@pytest.mark.parametrize(
    "block, needle",
    [
        ({"cpu_checkpointing": "yes"}, "activation_checkpointing.cpu_checkpointing"),
        ({"number_checkpoints": 0}, "activation_checkpointing.number_checkpoints"),
        ({"checkpoint_unit": True}, "checkpoint_units"),
    ],
)
def test_bad_block_values_name_the_key(block, needle):
    with pytest.raises(ConfigError, match=needle):
        parse(block)


# --- the machinery ---------------------------------------------------------------------------------


def tiny_gpt(dropout: float = 0.2) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY.__dict__, "dropout": dropout}))


def grads_of(model: nn.Module, idx: torch.Tensor):
    """Loss, gradients and saved activation bytes of one functional forward+backward (dropout seeded)."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    with ac.SavedTensorBytes(exclude=list(params.values())) as saved:
        loss = torch.func.functional_call(model, params, (idx, idx))
    return loss, torch.autograd.grad(loss, list(params.values())), saved.nbytes


def test_unit_checkpointing_equals_plain_and_keeps_fewer_bytes():
    plain, checkpointed = tiny_gpt(), tiny_gpt()
    wrapped = ac.install_unit_checkpointing(
        checkpointed, ac.ActivationCheckpointingConfig(), ["blocks.0", "blocks.1"]
    )
    assert wrapped == ["blocks.0", "blocks.1"]
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.block_size), generator=torch.Generator().manual_seed(0))
    loss_a, grads_a, bytes_a = grads_of(plain, idx)
    loss_b, grads_b, bytes_b = grads_of(checkpointed, idx)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert bytes_b * 2 < bytes_a, (bytes_a, bytes_b)
    assert ac.remove_unit_checkpointing(checkpointed) == ["blocks.0", "blocks.1"]
    assert "forward" not in checkpointed.blocks[0].__dict__


def test_configure_applies_options(monkeypatch):
    packed = []

    class Recording(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory=pin_memory, device_type=device_type)
            pack = self.pack_hook
            self.pack_hook = lambda t: packed.append(t.shape) or pack(t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Recording)
    assert not ckpt.is_configured()

    class TwoRanks:
        def get_model_parallel_world_size(self):
            return 2

        def get_model_parallel_rank(self):
            return 0

    with pytest.warns(ConfigWarning, match="whole on all 2 model-parallel ranks"):
        ckpt.configure(
            TwoRanks(),
            deepspeed_config={"activation_checkpointing": {"partition_activations": True, "profile": False}},
            checkpoint_in_cpu=True,
            synchronize=True,
            profile=True,
        )
    assert ckpt.is_configured()
    settings = ac.configured_settings()
    assert settings.partition_activations and settings.cpu_checkpointing and settings.profile
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    x = torch.randn(3, 4, requires_grad=True)
    before = (ac.PROFILE.calls, ac.PROFILE.recomputations)
    out = ckpt.checkpoint(block, x)
    assert packed == [(3, 4)]  # the checkpoint's input went to host memory, nothing inside the block did
    out.sum().backward()
    assert (ac.PROFILE.calls, ac.PROFILE.recomputations) == (before[0] + 1, before[1] + 1)
    expected = torch.autograd.grad(block(x).sum(), x)[0]
    assert torch.equal(x.grad, expected)
    with pytest.raises(ValueError, match="num_checkpoints"):
        ckpt.configure(None, num_checkpoints=0)


def test_rng_tracker_stream_is_replayed_in_the_recomputation():
    ckpt.model_parallel_cuda_manual_seed(5)
    tracker = ckpt.get_cuda_rng_tracker()
    layer = nn.Linear(6, 6)

    def body(x):
        with tracker.fork():
            return F.dropout(layer(x), 0.5, training=True)

    x = torch.randn(4, 6, requires_grad=True)
    states = tracker.get_states()
    ref = torch.autograd.grad(body(x).square().sum(), x)[0]
    tracker.set_states(states)
    got = torch.autograd.grad(ckpt.checkpoint(body, x).square().sum(), x)[0]
    assert torch.equal(ref, got)


# --- the engine ------------------------------------------------------------------------------------


def gpt_loss(model, batch):
    return model(batch[0], batch[1])


def gpt_config(stage: int, world_size: int, checkpoint_units: bool) -> Config:
    d = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": GAS,
        # several ranks, stages 0-1: collectives from gradient hooks in an eager backward
        "zero_optimization": {"stage": stage, "overlap_comm": world_size > 1 and stage < 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
    }
    if checkpoint_units:
        d["activation_checkpointing"] = {"checkpoint_units": True}
    return Config.from_dict(d, world_size=world_size)


def gpt_batches(world_size: int, steps: int = STEPS):
    g = torch.Generator().manual_seed(1)
    rows = MB * GAS * world_size
    return [torch.randint(0, TINY.vocab_size, (rows, TINY.block_size), generator=g) for _ in range(steps)]


def train_gpt(rank: int, world_size: int, stage: int, checkpoint_units: bool, steps: int = STEPS):
    engine = initialize(
        tiny_gpt(), gpt_config(stage, world_size, checkpoint_units), loss_fn=gpt_loss, compile=False
    )
    assert engine.checkpointed_units == (["blocks.0", "blocks.1"] if checkpoint_units else [])
    state = engine.init(seed=3)
    per = MB * GAS
    losses = []
    for x in gpt_batches(world_size, steps):
        mine = x[rank * per : (rank + 1) * per]
        state = engine.step(state, (mine, mine))
        losses.append(float(state.metrics.loss))
    return engine.full_params(state), losses


def both_ways(rank: int, world_size: int, stages: tuple[int, ...], steps: int = STEPS):
    return {(s, c): train_gpt(rank, world_size, s, c, steps) for s in stages for c in (False, True)}


def assert_same(results, stages, atol=1e-6):
    for stage in stages:
        (plain, losses_a), (checkpointed, losses_b) = results[stage, False], results[stage, True]
        assert losses_a == pytest.approx(losses_b, abs=atol), f"stage {stage}"
        for name, p in plain.items():
            err = float((checkpointed[name] - p).abs().max())
            assert err <= atol, f"stage {stage} {name}: {err:.2e}"


def test_engine_one_rank_stages_0_and_3():
    assert_same(both_ways(0, 1, (0, 3)), (0, 3), atol=0.0)


def test_engine_two_ranks_stages_0_to_3():
    # one step of two micro-batches: stage 3's second micro-batch already prefetches (its first recorded
    # the order), so gathers run ahead of the recomputations too
    stages = (0, 1, 2, 3)
    for rank_results in spawn_ranks(both_ways, 2, stages, 1, timeout=240):
        assert_same(rank_results, stages)


def test_compiled_step_with_checkpointed_units_equals_eager_plain():
    def run(compile: bool, checkpoint_units: bool):
        d = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
        if checkpoint_units:
            d["activation_checkpointing"] = {"checkpoint_units": True}
        engine = initialize(Net(), Config.from_dict(d), loss_fn=mse, compile=compile)
        state = engine.init()
        g = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            state = engine.step(state, (torch.randn(4, 5, generator=g), torch.randn(4, 1, generator=g)))
        return engine.full_params(state)

    ref, got = run(False, False), run(True, True)
    for name, p in ref.items():
        assert float((got[name] - p).abs().max() / p.abs().max()) <= 1e-5, name


@pytest.mark.parametrize("stage", [0, 3])
def test_facade_with_checkpointed_units_equals_plain(stage):
    def run(checkpoint_units: bool):
        d = {"train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": GAS}
        d.update(zero_optimization={"stage": stage}, optimizer={"type": "AdamW", "params": {"lr": 1e-2}})
        if checkpoint_units:
            d["activation_checkpointing"] = {"checkpoint_units": True}
        engine, *_ = zerostep.initialize(model=tiny_gpt(), config=d, compile=False)
        torch.manual_seed(2)
        for x in gpt_batches(1):
            for i in range(GAS):
                part = x[i * MB : (i + 1) * MB]
                engine.backward(engine(part, part))
                engine.step()
        return engine._core.full_params(engine.state)

    plain, checkpointed = run(False), run(True)
    for name, p in plain.items():
        assert torch.equal(checkpointed[name], p), name
