"""core/inference/loading: every weight source reads exactly ``shard_of_full``'s shard (zerostep checkpoint
directories, safetensors slices, mmap'd state dicts), and a checkpoint of another model, or a model that
cannot be served, fails before any work with what differs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zerostep
from zerostep.core.gpt import GPT, GPTConfig
from zerostep.core.inference import loading
from zerostep.errors import ConfigError
from zerostep.io import CheckpointError
from zerostep.parallel.tensor_parallel import ShardSpec, shard_of_full

CFG = GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16)


def gpt(cfg: GPTConfig = CFG, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same weights as a zerostep checkpoint (ZeRO-3 of one rank), a safetensors and a .pt file."""
    from safetensors.torch import save_file
    from test_inference import tokens, train_and_save

    path = tmp_path_factory.mktemp("weights")
    trained = train_and_save(CFG, tokens(2, 16), path / "ck", stage=3, world_size=1)
    state = {k: v.detach().contiguous() for k, v in trained.named_parameters()}
    save_file(state, str(path / "w.safetensors"))
    torch.save(state, path / "w.pt")
    return state, [str(path / "ck"), str(path / "w.safetensors"), str(path / "w.pt")]


def test_every_source_reads_each_ranks_shard_exactly(sources, monkeypatch):
    state, paths = sources
    monkeypatch.setattr(loading, "_CHUNK_BYTES", 200)  # row-parallel reads in chunks of a few rows
    fused_qkv = ShardSpec(0, 2, (32, 32, 32))
    cases = {
        "blocks.0.attn.qkv.weight": [fused_qkv, ShardSpec(1, 4)],
        "blocks.0.attn.qkv.bias": [fused_qkv],
        "blocks.0.out.weight": [ShardSpec(1, 2), ShardSpec(0, 4)],  # [32, 128]: 25 rows per chunk
        "wte.weight": [ShardSpec(0, 2), ShardSpec(None)],
    }
    for path in paths:
        with loading.open_weights(path) as source:
            assert source.shapes == {k: tuple(v.shape) for k, v in state.items()}
            for name, specs in cases.items():
                for spec in specs:
                    for rank in range(spec.tp_size):
                        got = loading._read_shard(source, name, spec, rank)
                        assert torch.equal(got, shard_of_full(state[name], spec, rank)), (path, name, spec)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    tp=st.integers(1, 3),
    parts=st.integers(1, 3),
    data=st.data(),
)
def test_shard_ranges_are_shard_of_full(shape, tp, parts, data):
    dim = data.draw(st.integers(0, len(shape) - 1))
    shape[dim] *= tp * parts
    full = torch.arange(torch.Size(shape).numel()).view(shape)
    spec = ShardSpec(dim, tp, (shape[dim] // parts,) * parts if parts > 1 else ())
    for rank in range(tp):
        ranges = loading.shard_ranges(shape[dim], spec, rank)
        sliced = torch.cat([full.narrow(dim, a, b - a) for a, b in ranges], dim)
        assert torch.equal(sliced, shard_of_full(full, spec, rank))


def test_another_models_checkpoint_fails_before_any_work(sources):
    _, (ck, safetensors, pt) = sources
    other = GPTConfig(n_layer=2, n_embd=48, n_head=4, block_size=16)
    for path in (safetensors, pt):
        with pytest.raises(
            CheckpointError,
            match=r"another model; missing from the checkpoint: blocks\.1\..*shapes differ: "
            r"blocks\.0\.attn\.proj\.bias: checkpoint \[32\] vs model \[48\]",
        ):
            zerostep.init_inference(gpt(other), dtype="fp32", checkpoint=path)
    # at tp_size 2 the check comes before sharding: no process group is needed to hear of it
    with pytest.raises(CheckpointError, match="another model.*shapes differ"):
        zerostep.init_inference(gpt(other), dtype="fp32", checkpoint=ck, tensor_parallel={"tp_size": 2})
    with pytest.raises(
        CheckpointError,
        match="missing from the checkpoint: bias, weight; not in the model: blocks.0.attn.proj.bias, ",
    ):
        zerostep.init_inference(torch.nn.Linear(2, 2), dtype="fp32", checkpoint=pt)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        zerostep.init_inference(gpt(), dtype="fp32", checkpoint=pt + ".missing")


def test_a_zero_init_model_loads_at_tp1_and_a_bare_meta_one_needs_a_checkpoint(sources):
    state, (ck, safetensors, _) = sources
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = gpt()
    ref.load_state_dict(state, strict=False)
    for path in (ck, safetensors):
        with zerostep.zero.Init():
            model = GPT(CFG)
        served = zerostep.init_inference(model, dtype="fp32", checkpoint=path)
        torch.testing.assert_close(served(x), ref(x), rtol=0, atol=1e-6)
        assert served.module.head.weight is served.module.wte.weight  # the tie survives the meta swap
    torch.manual_seed(0)
    with zerostep.zero.Init():
        recorded = GPT(CFG)  # without a checkpoint: its recorded initial values, gpt()'s
    torch.testing.assert_close(zerostep.init_inference(recorded, dtype="fp32")(x), gpt()(x), rtol=0, atol=0)
    with torch.device("meta"):
        bare = GPT(CFG)
    with pytest.raises(ValueError, match=r"parameter wte.weight \(and no checkpoint=\).*zerostep.zero.Init"):
        zerostep.init_inference(bare, dtype="fp32")


def test_hf_sizes_and_architectures_without_a_policy_are_named():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=24, n_head=6, n_positions=16, vocab_size=64)
    )
    with pytest.raises(
        ConfigError, match="init_inference: .*tp_size=4 does not divide num_attention_heads=6"
    ):
        zerostep.init_inference(gpt2, dtype="fp32", tensor_parallel={"tp_size": 4})
    with pytest.raises(
        ConfigError, match="init_inference: .*tp_size=5 does not divide num_attention_heads=6"
    ):
        zerostep.init_inference(gpt2, dtype="fp32", mp_size=5)
    bert = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
        )
    )
    with pytest.raises(
        ConfigError, match=r"no tensor-parallel policy for BertModel \(model_type 'bert'\).*injection_policy"
    ):
        zerostep.init_inference(bert, dtype="fp32", tensor_parallel={"tp_size": 2})
