"""core/autotp: the policies of zerostep's GPT and tiny random-init Hugging Face GPT-2, OPT and LLaMA, a
user policy, the errors; one 2-rank gloo run checks TP=2 forward, gradients and greedy generate equal
to the unsharded model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from zerostep.core.autotp import tp_plan
from zerostep.core.gpt import GPT, GPTConfig
from zerostep.errors import ConfigError
from zerostep.parallel.launch import spawn_ranks
from zerostep.parallel.tensor_parallel import plan_specs

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 16, **kw})).eval()


def hf(kind: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A tiny random-init causal LM (no download)."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            **{"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 32, **TINY, **kw}
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "opt":
        sizes = {"hidden_size": 32, "num_attention_heads": 4, "ffn_dim": 64, "word_embed_proj_dim": 32}
        cfg = transformers.OPTConfig(
            **{"num_hidden_layers": 2, "max_position_embeddings": 32, **sizes, **TINY, **kw}
        )
        model = transformers.OPTForCausalLM(cfg)
    else:
        sizes = {
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
        }
        cfg = transformers.LlamaConfig(
            **{"num_hidden_layers": 2, "max_position_embeddings": 32, **sizes, **TINY, **kw}
        )
        model = transformers.LlamaForCausalLM(cfg)
    return model.eval()


def test_known_policies_split_blocks_and_tie_embeddings_consistently():
    specs = plan_specs(gpt(), tp_plan(gpt(), 2), 2)
    assert specs["blocks.0.attn.qkv.weight"].fused == (32, 32, 32) and specs["head.weight"].dim == 0
    assert specs["wte.weight"] == specs["head.weight"] and not specs["wpe.weight"].sharded

    g2 = hf("gpt2")
    plan = tp_plan(g2, 2)
    assert (
        plan.layers["transformer.h.1.attn.c_attn"] == "colwise"
        and "transformer.h.1.mlp.c_proj" in plan.transposed
    )
    specs = plan_specs(g2, plan, 2)
    # Conv1D [in, out]: colwise splits dim 1, rowwise dim 0
    assert (
        specs["transformer.h.0.attn.c_attn.weight"].dim == 1
        and specs["transformer.h.0.mlp.c_proj.weight"].dim == 0
    )
    assert specs["transformer.wte.weight"] == specs["lm_head.weight"] and specs["lm_head.weight"].sharded
    assert plan.fixups["transformer.h.0.attn"] == ("num_heads", "split_size")

    opt = tp_plan(hf("opt"), 2)
    assert opt.layers["model.decoder.layers.1.fc2"] == "rowwise" and opt.layers["lm_head"] == "colwise_gather"
    llama = tp_plan(hf("llama"), 2)
    assert llama.layers["model.layers.0.mlp.gate_proj"] == "colwise"
    assert llama.layers["model.layers.0.self_attn.o_proj"] == "rowwise"
    assert llama.layers["model.embed_tokens"] == "vocab"

    # a vocabulary tp does not divide (GPT-2's 50257): embedding and tied head both stay replicated
    with pytest.warns(UserWarning, match=r"does not divide the vocabulary \(63\).*tied"):
        odd = tp_plan(hf("gpt2", vocab_size=63), 2)
    assert "transformer.wte" not in odd.layers and "lm_head" not in odd.layers


def test_user_policy_rowwise_names_others_colwise():
    block = transformers.models.gpt2.modeling_gpt2.GPT2Block
    model = hf("gpt2")
    plan = tp_plan(model, 2, {block: ("attn.c_proj", "mlp.c_proj")})
    assert plan.layers == tp_plan(model, 2).layers
    assert plan.fused == tp_plan(model, 2).fused and plan.transposed == tp_plan(model, 2).transposed
    assert plan.fixups["transformer.h.0.attn"] == ("num_heads", "split_size")
    by_name = tp_plan(gpt(), 2, {"Block": ("attn.proj", "out")})
    assert by_name.layers["blocks.1.fc"] == "colwise" and by_name.fused["blocks.0.attn.qkv"] == (32,) * 3
    with pytest.raises(ConfigError, match=r"Block has no Linear/Conv1D \['attn.nope'\]"):
        tp_plan(gpt(), 2, {"Block": ("attn.nope",)})
    with pytest.raises(ConfigError, match="no Missing module in GPT"):
        tp_plan(gpt(), 2, {"Missing": ("x",)})


def test_errors_name_what_does_not_divide_or_fit():
    with pytest.raises(ConfigError, match="tp_size=3 does not divide n_head=4"):
        tp_plan(gpt(), 3)
    with pytest.raises(ConfigError, match="MoE GPT"):
        tp_plan(gpt(n_experts=2), 2)
    with pytest.raises(ConfigError, match="tp_size=4 does not divide num_key_value_heads=2"):
        tp_plan(hf("llama"), 4)
    with pytest.raises(ConfigError, match="tp_size=3 does not divide num_attention_heads=4"):
        tp_plan(hf("opt"), 3)
    with pytest.raises(ConfigError, match="tp_size=2 does not divide intermediate_size=63"):
        tp_plan(hf("llama", intermediate_size=63), 2)
    with pytest.raises(
        ConfigError, match=r"no policy for Sequential; known: zerostep.core.gpt.GPT, .*'llama'"
    ):
        tp_plan(torch.nn.Sequential(torch.nn.Linear(2, 2)), 2)
    bert = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    )
    with pytest.raises(ConfigError, match=r"no policy for BertModel \(model_type 'bert'\).*injection_policy"):
        tp_plan(transformers.BertModel(bert), 2)


# ---------------------------------------------------------------------------------------------------------
# 2 ranks
# ---------------------------------------------------------------------------------------------------------


def _logits(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def _compare(ref: torch.nn.Module, ids: torch.Tensor, group, injection_policy=None) -> dict:
    """Shard a copy of ``ref``; max abs differences of logits and of every gradient (reassembled)."""
    import torch.distributed as dist

    from zerostep.parallel.tensor_parallel import full_from_shards, shard_module

    model = copy.deepcopy(ref)
    specs = shard_module(model, tp_plan(model, 2, injection_policy), group)
    weight = torch.randn(_logits(ref, ids).shape, generator=torch.Generator().manual_seed(7))
    (_logits(ref, ids) * weight).sum().backward()
    logits = _logits(model, ids)
    (logits * weight).sum().backward()
    ref_params = dict(ref.named_parameters())
    grad_diff, sharded = 0.0, 0
    for name, p in model.named_parameters():
        spec = specs[name]
        if spec.sharded:
            sharded += 1
            pieces = [torch.empty_like(p.grad) for _ in range(2)]
            dist.all_gather(pieces, p.grad.contiguous(), group=group)
            full = full_from_shards(pieces, spec)
        else:
            full = p.grad
        grad_diff = max(grad_diff, (full - ref_params[name].grad).abs().max().item())
    return {
        "logits": (logits - _logits(ref, ids)).abs().max().item(),
        "grads": grad_diff,
        "sharded": sharded,
        "ref_grad_scale": max(p.grad.abs().max().item() for p in ref.parameters()),
    }


def tp_rank(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    import zerostep

    torch.use_deterministic_algorithms(True)
    group = dist.group.WORLD
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    out = {"gpt": _compare(gpt(), ids, group)}
    for kind in ("gpt2", "opt", "llama"):
        out[kind] = _compare(hf(kind), ids, group)
    block = transformers.models.gpt2.modeling_gpt2.GPT2Block
    out["gpt2_user_policy"] = _compare(hf("gpt2"), ids, group, {block: ("attn.c_proj", "mlp.c_proj")})
    # inference: init_inference shards a copy, greedy generate through the HF model's own generate
    prompt = ids[:1, :5]
    same = {}
    for kind in ("gpt2", "llama"):
        ref = hf(kind)
        with torch.no_grad():
            want = ref.generate(prompt, max_new_tokens=6, do_sample=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = zerostep.init_inference(copy.deepcopy(ref), dtype="fp32", tensor_parallel={"tp_size": 2})
        got = engine.generate(prompt, max_new_tokens=6, do_sample=False)
        same[kind] = torch.equal(got, want) and engine.module.lm_head.weight.shape[0] == 32
    out["generate"] = same
    return out


def test_tp2_forward_gradients_and_generate_equal_unsharded():
    for out in spawn_ranks(tp_rank, 2, timeout=120):
        for kind in ("gpt", "gpt2", "opt", "llama", "gpt2_user_policy"):
            r = out[kind]
            assert r["sharded"] >= 8, (kind, r)
            assert r["logits"] < 1e-5, (kind, r)
            assert r["grads"] < 1e-5 * max(1.0, r["ref_grad_scale"]), (kind, r)
        assert out["generate"] == {"gpt2": True, "llama": True}
