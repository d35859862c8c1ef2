"""The hybrid engine (core/hybrid_engine.py, core/config/hybrid.py): engine.generate on the trained
weights equals the trained module's generate, at ZeRO stages 0 and 3; stage 3 releases what it gathered.
With ``inference_tp_size = 2`` (core/hybrid_tp.py, one 2-rank spawn) each rank's tokens, generated
tensor-parallel over both ranks, equal a plain generate of its own prompt, at stages 0 and 3."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import zerostep
from zerostep.core.config import Config, ConfigError
from zerostep.core.gpt import GPT, GPTConfig
from zerostep.core.hybrid_engine import requested_length
from zerostep.core.module_binding import is_released
from zerostep.parallel.launch import spawn_ranks

GPT_CFG = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)


def _config(stage: int, world: int = 1, **hybrid) -> dict:
    return {
        "train_batch_size": 2 * world,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
        "hybrid_engine": {"enabled": True, "max_out_tokens": 32, **hybrid},
    }


def _trained(stage: int, world: int = 1, rank: int = 0, steps: int = 2, **hybrid):
    torch.manual_seed(0)
    engine, *_ = zerostep.initialize(
        model=GPT(GPT_CFG), config=_config(stage, world, **hybrid), compile=False
    )
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        idx = torch.randint(0, 256, (2, 9), generator=g)
        engine.backward(engine(idx[:, :-1], idx[:, 1:]))
        engine.step()
    return engine


def _reference_tokens(engine, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """The trained weights in a plain GPT, generating in eval mode."""
    ref = GPT(GPT_CFG)
    ref.load_state_dict(engine._core.full_params(engine.state), strict=False)
    ref.eval()
    return ref.generate(prompt, n, seed=3)


PROMPT = torch.tensor([1, 2, 3, 4])


@pytest.mark.parametrize("stage", [0, 3])
def test_generate_equals_the_trained_modules(stage):
    engine = _trained(stage)
    assert engine.module.training
    out = engine.generate(PROMPT, 6, seed=3)
    assert out.shape == (10,)
    assert torch.equal(out, _reference_tokens(engine, PROMPT, 6))
    assert engine.module.training  # put back
    # DeepSpeed-Chat calls the module's generate: rerouted through the hybrid engine
    assert torch.equal(engine.module.generate(PROMPT, 6, seed=3), out)
    # training goes on after generating, and generation follows the new weights
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(7))
    engine.backward(engine(idx[:, :-1], idx[:, 1:]))
    engine.step()
    assert torch.equal(engine.generate(PROMPT, 6, seed=3), _reference_tokens(engine, PROMPT, 6))


@pytest.mark.filterwarnings("ignore:hybrid_engine.max_out_tokens is not checked")  # the spy's signature
def test_stage3_gathers_for_the_call_and_releases_after():
    engine = _trained(3, steps=1)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    seen = []
    inner = engine._hybrid._generate

    def spy(*args, **kwargs):
        seen.append(all(not is_released(p) for p in trainable))
        return inner(*args, **kwargs)

    engine._hybrid._generate = spy
    expected = _reference_tokens(engine, PROMPT, 4)
    assert torch.equal(engine.generate(PROMPT, 4, seed=3), expected)
    assert seen == [True]  # pinned: the whole model gathered for the call
    assert all(is_released(p) and p.numel() == 0 for p in trainable)  # and released after


def test_stage3_unpinned_gathers_block_by_block():
    engine = _trained(3, steps=1, pin_parameters=False)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    out = engine.generate(PROMPT, 4, seed=3)
    assert torch.equal(out, _reference_tokens(engine, PROMPT, 4))
    full_bytes = sum(p.ds_numel for p in trainable) * 4
    assert 0 < engine._hybrid.last_peak_gathered_bytes < full_bytes
    assert all(is_released(p) for p in trainable)


def test_eval_train_round_trip_and_eval_mode_kept():
    engine = _trained(0, steps=1)
    engine.eval()
    assert not engine.module.training and not engine.module.blocks[0].drop.training
    engine.generate(PROMPT, 2)
    assert not engine.module.training
    engine.train()
    assert engine.module.training and engine.module.blocks[0].drop.training


def test_release_inference_cache_after_each_call(monkeypatch):
    import zerostep.core.hybrid_engine as hybrid

    released = []
    monkeypatch.setattr(hybrid, "_release_cache", lambda device: released.append(device))
    engine = _trained(0, steps=0, release_inference_cache=True)
    engine.generate(PROMPT, 1)
    with pytest.raises(ValueError):
        engine.generate(PROMPT, 40)  # refused before generating: nothing cached
    assert released == [engine.device]
    _trained(0, steps=0).generate(PROMPT, 1)  # off by default
    assert len(released) == 1


def test_max_out_tokens_is_a_bound():
    engine = _trained(0, steps=1)
    with pytest.raises(
        ValueError,
        match=r"asks for up to 36 tokens \(prompt and new ones\), more than hybrid_engine.max_out_tokens = 3",
    ):
        engine.generate(PROMPT, 32)
    gen = engine._hybrid._generate
    assert requested_length(gen, (PROMPT,), {"new_tokens": 5}, engine.module) == 9
    hf_like = lambda inputs=None, **kwargs: None  # noqa: E731
    ids = torch.zeros(1, 6)
    assert requested_length(hf_like, (), {"input_ids": ids, "max_new_tokens": 4}, engine.module) == 10
    assert requested_length(hf_like, (ids,), {"max_length": 20}, engine.module) == 20
    assert requested_length(hf_like, (ids,), {}, engine.module) is None


def test_bad_input():
    class NoGenerate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x).sum()

    with pytest.raises(ValueError, match="NoGenerate has no generate"):
        zerostep.initialize(model=NoGenerate(), config=_config(0), compile=False)
    with pytest.raises(ValueError, match="inference_tp_size = 2 needs torch.distributed"):
        zerostep.initialize(model=GPT(GPT_CFG), config=_config(0, inference_tp_size=2), compile=False)
    with pytest.raises(ConfigError, match="inference_tp_size = 0"):
        Config.from_dict(_config(0, inference_tp_size=0))
    with pytest.raises(ConfigError, match="did you mean 'max_out_tokens'"):
        Config.from_dict(_config(0, max_out_token=8))
    with pytest.raises(ConfigError, match="pin_parameters = 1: must be true or false"):
        Config.from_dict(_config(0, pin_parameters=1))
    with pytest.warns(UserWarning, match="pin_parameters = false has no effect below ZeRO stage 3"):
        _trained(0, steps=0, pin_parameters=False)
    with pytest.warns(UserWarning, match="enable_cuda_graph has no effect"):
        _trained(0, steps=0, enable_cuda_graph=True)


@pytest.mark.parametrize("stage, pin", [(3, False)])  # unpinned: HF generate under the ZeRO-3 hooks
def test_hugging_face_generate(stage, pin):
    transformers = pytest.importorskip("transformers")

    def gpt2() -> nn.Module:
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
        return transformers.GPT2LMHeadModel(config)

    cfg = _config(stage, pin_parameters=pin)
    engine, *_ = zerostep.initialize(model=gpt2(), config=cfg, compile=False)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    prompt = ids[:1, :4]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    out = engine.generate(input_ids=prompt, **kwargs)
    ref = gpt2()
    ref.load_state_dict(engine._core.full_params(engine.state), strict=False)
    ref.eval()
    with torch.no_grad():
        assert torch.equal(out, ref.generate(input_ids=prompt, **kwargs))
    with pytest.raises(ValueError, match="asks for up to 44 tokens"):
        engine.generate(input_ids=prompt, max_new_tokens=40)


def test_disabled_passes_through():
    cfg = _config(0)
    del cfg["hybrid_engine"]
    engine, *_ = zerostep.initialize(model=GPT(GPT_CFG), config=cfg, compile=False)
    assert engine._hybrid is None and engine.module.generate.__self__ is engine.module
    assert engine.generate(PROMPT, 2).shape == (6,)


def _two_ranks(rank: int, world: int) -> list[torch.Tensor]:
    engine = _trained(3, world=world, rank=rank)
    out = engine.generate(PROMPT, 6, seed=3)
    assert all(is_released(p) for p in engine.module.parameters() if p.requires_grad)
    return [out, _reference_tokens(engine, PROMPT, 6)]


@pytest.mark.skipif(os.environ.get("ZEROSTEP_SLOW_TESTS") != "1", reason="2 ranks: ~10 s")
def test_two_ranks_stage3():
    (a, ref_a), (b, ref_b) = spawn_ranks(_two_ranks, 2, timeout=120)
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b) and torch.equal(a, b)


def _inference_tp_ranks(rank: int, world: int) -> dict:
    out = {}
    for stage in (0, 3):
        engine = _trained(stage, world=world, rank=rank, steps=1, inference_tp_size=2)
        tp = engine._hybrid.tensor_parallel
        prompt = PROMPT + rank  # each rank its own prompt: the members' calls run in turn
        tokens = engine.generate(prompt, 3, seed=3)
        out[stage] = {
            "tokens": tokens,
            "reference": _reference_tokens(engine, prompt, 3),
            "sharded": sorted(n for n, s in tp.specs.items() if s.sharded),
            "shard_bytes": tp.last_shard_bytes,
            "full_bytes": sum(p.numel() * 4 for p in GPT(GPT_CFG).parameters()),
            "released": all(p.is_meta for p in tp.skeleton.parameters()),
            "stage3_released": stage < 3 or all(is_released(p) for p in engine.module.parameters()),
        }
    if world == 2:
        try:
            _trained(0, world=world, rank=rank, steps=0, inference_tp_size=4)
        except ValueError as e:
            out["bad_size"] = str(e)
    return out


def test_two_ranks_inference_tp2_generates_each_ranks_prompt_on_shards():
    results = spawn_ranks(_inference_tp_ranks, 2, timeout=180)
    for rank, out in enumerate(results):
        for stage in (0, 3):
            got = out[stage]
            assert torch.equal(got["tokens"], got["reference"]), (rank, stage)
            assert got["tokens"][:4].tolist() == (PROMPT + rank).tolist()
            assert "blocks.0.attn.qkv.weight" in got["sharded"] and "wte.weight" in got["sharded"]
            assert got["shard_bytes"] < 0.75 * got["full_bytes"]  # the blocks' and embedding's halves
            assert got["released"] and got["stage3_released"]
        assert "inference_tp_size = 4 does not divide the world size 2" in out["bad_size"]
    assert not torch.equal(results[0][0]["tokens"], results[1][0]["tokens"])
