"""core/inference/static_cache: zerostep's GPT decoding through a static KV cache (eager and compiled once,
no recompiles), equal to the uncached forward; Hugging Face's static cache behind the compiled forward.

Compiling with inductor costs ~10 s per graph on this machine, so the default tests compile with dynamo's
``eager`` backend (the same graphs, guards and recompile decisions, without code generation); the
inductor versions run with ZEROSTEP_SLOW_TESTS=1."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import zerostep
from zerostep.core.gpt import GPT, GPTConfig
from zerostep.core.inference import engine as engine_module
from zerostep.core.inference.static_cache import CachedGPTDecoder, StaticKVCache, supports

TINY = GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=32)
slow = pytest.mark.skipif(
    os.environ.get("ZEROSTEP_SLOW_TESTS") != "1", reason="inductor compiles: ~10-30 s; ZEROSTEP_SLOW_TESTS=1"
)


def gpt(cfg: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def prompts(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def uncached_greedy(model: GPT, idx: torch.Tensor, new: int) -> torch.Tensor:
    for _ in range(new):
        idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def engine(model: GPT, **kw) -> zerostep.core.inference.InferenceEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "compiled with torch.compile instead"
        return zerostep.init_inference(copy.deepcopy(model), **{"dtype": "fp32", **kw})


def test_cached_logits_and_tokens_equal_the_uncached_forward():
    model, x = gpt(), prompts()
    cache = StaticKVCache(
        TINY.n_layer, (2, TINY.n_head, 16, TINY.n_embd // TINY.n_head), torch.float32, "cpu"
    )
    decoder = CachedGPTDecoder(model, cache)
    with torch.no_grad():
        ref = model(x)  # [B, T, V]
        prefill = decoder(x[:, :4], torch.arange(4))  # the first 4 positions, then 2 one at a time
        steps = [decoder(x[:, t : t + 1], torch.tensor([t])) for t in (4, 5)]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), ref, rtol=0, atol=1e-5)

    served = engine(model)
    assert served.static_cache is not None and served.compile_mode is None
    assert torch.equal(served.generate(x, 10, do_sample=False), uncached_greedy(model, x, 10))
    # sampling: GPT.generate's contract (a [T] prompt, the same seeded draws)
    assert torch.equal(served.generate(x[0], 8, seed=3), model.generate(x[0], 8, seed=3))
    with pytest.raises(RuntimeError, match=r"\(40\) exceed the GPT's block_size=32"):
        served.generate(x, 34)
    with pytest.raises(RuntimeError, match=r"\(10\) exceed max_out_tokens=8"):
        engine(model, max_out_tokens=8).generate(x, 4)
    assert not supports(gpt(GPTConfig(n_layer=1, n_embd=32, n_head=2, n_experts=2)))


def test_the_decode_step_compiles_once_and_never_recompiles(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(engine_module, "COMPILE_BACKEND", "eager")
    # dynamo's code cache is per process: an earlier compile of the decode step (another backend, dtype
    # or batch size) would make this test's first compile a recompile
    torch._dynamo.reset()
    model, x = gpt(), prompts()
    served = engine(model, kernel_inject=True)
    assert served.compile_mode == "default"
    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile raises
        first = served.generate(x, 12, do_sample=False)  # 11 decode steps
        second = served.generate(x.flip(1), 12, do_sample=False)  # other tokens, same shapes
    assert counters["stats"]["unique_graphs"] - before == 1  # the decode step; the prefill runs eager
    assert torch.equal(first, uncached_greedy(model, x, 12))
    assert torch.equal(second, uncached_greedy(model, x.flip(1), 12))


@slow
def test_inductor_compiled_decode_gives_the_uncached_tokens():
    torch._dynamo.reset()  # the eager-backend compile above is cached for the same code: BACKEND_MATCH
    model, x = gpt(), prompts()
    served = engine(model, kernel_inject=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(served.generate(x, 12, do_sample=False), uncached_greedy(model, x, 12))
    int8 = engine(model, dtype="int8", kernel_inject=True)  # int8 linears inside the compiled step
    eager_int8 = engine(model, dtype="int8")
    assert torch.equal(int8.generate(x, 12, do_sample=False), eager_int8.generate(x, 12, do_sample=False))


def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=4, n_positions=64, vocab_size=64, bos_token_id=1, eos_token_id=2
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def _hf_check(monkeypatch, compiled: bool) -> None:
    """The engine's generate over a compiled HF forward asks for the static cache and gives HF eager
    generate's tokens; ``compiled`` False runs the compiled forward with dynamo disabled (the wiring and
    the static cache's tokens, without ~10 s of tracing GPT-2)."""
    from torch._dynamo.utils import counters

    from zerostep.core.inference.static_cache import hf_static_cache_kwargs

    # a frame first run with dynamo disabled stays skipped in this process (the compiled=False test
    # before would make this one compile nothing): start from empty code caches
    torch._dynamo.reset()
    model = hf_gpt2()
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        want_again = model.generate(ids.flip(1), attention_mask=mask, max_new_tokens=10, do_sample=False)
    served = engine(model, kernel_inject=True)
    calls = []
    original = served.module.generate
    monkeypatch.setattr(served.module, "generate", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(disable=not compiled):
        got = served.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        graphs = counters["stats"]["unique_graphs"]
    assert (graphs > before) == compiled  # compiled: the forward's graphs (prefill, decode) were made
    # the same lengths: no new graph
    with torch._dynamo.config.patch(disable=not compiled, error_on_recompile=True):
        again = served.generate(ids.flip(1), attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(got, want) and torch.equal(again, want_again)
    assert calls[0]["cache_implementation"] == "static" and calls[0]["disable_compile"] is True
    # a cache the caller chose, or none, is left alone
    assert hf_static_cache_kwargs(model, {"use_cache": False}) == {"use_cache": False}
    assert hf_static_cache_kwargs(model, {"past_key_values": None}) == {"past_key_values": None}
    assert hf_static_cache_kwargs(torch.nn.Linear(1, 1), {}) == {}
    from transformers import GenerationConfig

    offloaded = {"generation_config": GenerationConfig(cache_implementation="offloaded")}
    assert hf_static_cache_kwargs(model, offloaded) == offloaded  # the caller's generation_config's cache
    model.generation_config.cache_implementation = "dynamic"  # as a hub generation_config.json may say
    assert hf_static_cache_kwargs(model, {}) == {}


def test_hf_generate_asks_for_the_static_cache_behind_the_compiled_forward(monkeypatch):
    try:
        _hf_check(monkeypatch, compiled=False)
    finally:
        torch._dynamo.reset()  # GPT-2's frames run with dynamo disabled stay skipped: later compiles in
        # this process (other tests) would run them eager


@slow
def test_hf_static_cache_with_the_compiled_forward_does_not_recompile(monkeypatch):
    _hf_check(monkeypatch, compiled=True)
