"""parallel/ulysses.py, zerostep.sequence and ``sequence_parallel_size``: one 2-rank gloo spawn checks the
all-to-all and its gradient, DistributedAttention against attention over the whole sequence, and GPT
training at SP=2 (functional API and facade) against one process; bad input is checked in-process."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from zerostep.core import Config, ConfigError
from zerostep.core.gpt import GPT, GPTConfig, LocalAttention
from zerostep.parallel import ulysses
from zerostep.parallel.launch import spawn_ranks

SP = 2
B, T, H, D = 2, 6, 4, 3  # attention checks: T / SP positions and H / SP heads per rank
GPT_CFG = GPTConfig(block_size=16, n_layer=1, n_head=4, n_embd=32)
SEQ, SAMPLES, MICRO, STEPS = 16, 12, 4, 3


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _gpt_config(sp: int, stage: int, micro: int = MICRO) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "sequence_parallel_size": sp,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
        "gradient_clipping": 1.0,
    }


def _gpt(sp: int) -> GPT:
    torch.manual_seed(0)  # same initial weights at every sequence-parallel size
    return GPT(GPTConfig(**{**GPT_CFG.__dict__, "sequence_parallel_size": sp}))


def _dataset(samples: int = SAMPLES) -> torch.utils.data.TensorDataset:
    tokens = torch.randint(0, 256, (samples, SEQ + 1), generator=torch.Generator().manual_seed(5))
    return torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])


def _functional_run(model: GPT, cfg: dict, batches: list, split) -> tuple[list[float], dict]:
    from zerostep.core import initialize

    engine = initialize(model, cfg, compile=False)
    state = engine.init(seed=0)
    losses = []
    for idx, targets in batches:
        state = engine.step(state, split({"idx": idx, "targets": targets}))
        losses.append(float(state.metrics.loss))
    return losses, engine.full_params(state)


def _exchange_checks(rank: int, groups: ulysses.SequenceGroups) -> list[str]:
    """The all-to-all's layout, round trip and gradient, in both of DeepSpeed's layouts and in bf16."""
    group, bad = groups.sp_group, []
    full = _rand(B, T, H, D, seed=1)  # every rank can rebuild every rank's chunk
    x = ulysses.sequence_chunk(full, groups).clone().requires_grad_(True)  # [B, T/2, H, D]
    heads = ulysses.sequence_to_heads(x, group)  # [B, T, H/2, D]
    if not torch.equal(heads, full[:, :, rank * H // SP : (rank + 1) * H // SP]):
        bad.append("sequence_to_heads: not this rank's heads of the whole sequence")
    if not torch.equal(ulysses.heads_to_sequence(heads, group), x):
        bad.append("heads_to_sequence(sequence_to_heads(x)) != x")
    weight = _rand(B, T, H, D, seed=2)  # d(loss)/d(heads) on rank r is weight's heads of rank r
    (heads * weight[:, :, rank * H // SP : (rank + 1) * H // SP]).sum().backward()
    if not torch.allclose(x.grad, ulysses.sequence_chunk(weight, groups)):
        bad.append("the all-to-all's gradient is not the inverse exchange")
    seq_first = full.transpose(0, 1).contiguous()  # [T, B, H, D]: Megatron's layout, scatter 2 gather 0
    mine = ulysses.sequence_chunk(seq_first, groups, dim=0)
    swapped = ulysses.all_to_all(mine, group, scatter_dim=2, gather_dim=0)
    if not torch.equal(swapped, seq_first[:, :, rank * H // SP : (rank + 1) * H // SP]):
        bad.append("all_to_all(scatter_dim=2, gather_dim=0) on [T/P, B, H, D]")
    half = ulysses.sequence_to_heads(x.detach().bfloat16(), group)
    if not torch.equal(half, heads.detach().bfloat16()):
        bad.append("bf16 exchange")
    for name, fn in [
        ("heads", lambda: ulysses.sequence_to_heads(torch.zeros(B, 3, 3, D), group)),
        ("length", lambda: ulysses.heads_to_sequence(torch.zeros(B, 5, 2, D), group)),
    ]:
        try:
            fn()
            bad.append(f"no error for an indivisible {name}")
        except ValueError as error:
            if "divisible" not in str(error):
                bad.append(f"unclear {name} error: {error}")
    return bad


def _attention_results(rank: int, groups: ulysses.SequenceGroups) -> dict:
    """DistributedAttention's output and input gradients on this rank's chunk, in both conventions."""
    from zerostep.sequence.cross_entropy import vocab_sequence_parallel_cross_entropy
    from zerostep.sequence.layer import DistributedAttention

    q, k, v = (_rand(B, T, H, D, seed=s) for s in (10, 11, 12))
    grad_out = _rand(B, T, H, D, seed=13)
    out = {}
    # DeepSpeed >= 0.15: [B, T/P, H, D] and batch_dim_idx=0
    attn = DistributedAttention(LocalAttention(0.0), groups.sp_group, scatter_idx=2, gather_idx=1)
    leaves = [ulysses.sequence_chunk(t, groups).clone().requires_grad_(True) for t in (q, k, v)]
    y = attn(*leaves, 0)
    (y * ulysses.sequence_chunk(grad_out, groups)).sum().backward()
    out["batch_first"] = (y.detach(), [t.grad for t in leaves])

    # DeepSpeed 0.14: [T/P, B, H, D], scatter 2 / gather 0 (the defaults), no batch_dim_idx
    def seq_first_attention(q, k, v):  # [T, B, h, D]
        return LocalAttention(0.0)(*(t.transpose(0, 1) for t in (q, k, v))).transpose(0, 1)

    attn = DistributedAttention(seq_first_attention, groups.sp_group)
    leaves = [
        ulysses.sequence_chunk(t.transpose(0, 1), groups, 0).clone().requires_grad_(True) for t in (q, k, v)
    ]
    y = attn(*leaves)
    (y * ulysses.sequence_chunk(grad_out.transpose(0, 1), groups, 0)).sum().backward()
    out["seq_first"] = (y.detach(), [t.grad for t in leaves])
    y = DistributedAttention(seq_first_attention, groups.sp_group)(*(t.detach() for t in leaves), 1)
    out["seq_first_batch_dim_1"] = y  # DeepSpeed >= 0.15 on [T/P, B, H, D]

    logits = ulysses.sequence_chunk(_rand(T, B, 7, seed=14), groups, 0).clone().requires_grad_(True)
    target = ulysses.sequence_chunk(torch.arange(T * B).reshape(T, B) % 7, groups, 0)
    losses = vocab_sequence_parallel_cross_entropy(logits, target, groups.sp_group)  # [T, B]
    losses.mean().backward()
    out["cross_entropy"] = (losses.detach(), [logits.grad])

    local = torch.tensor(float(rank + 1), requires_grad=True)
    total = ulysses.sequence_parallel_loss(local, groups.sp_group, weight=float(rank + 1))
    total.backward()
    out["weighted_loss"] = (total.detach(), [local.grad])
    return out


def _facade_run(rank: int, stage: int = 2, samples: int = SAMPLES) -> tuple:
    import zerostep
    import zerostep.utils.groups as ds_groups
    from zerostep.sequence import split_sequence

    model = _gpt(SP)
    config = _gpt_config(SP, stage)
    del config["sequence_parallel_size"]  # given as DeepSpeed's (data, sequence) device mesh instead
    mesh_param = (torch.distributed.get_world_size() // SP, SP)
    engine, _, _, _ = zerostep.initialize(model=model, config=config, mesh_param=mesh_param, compile=False)
    loader = engine.deepspeed_io(
        _dataset(samples), num_local_io_workers=0
    )  # no worker processes in a spawned rank
    facts = (
        engine.dp_world_size,
        engine.seq_dp_world_size,
        engine.sequence_parallel_size,
        engine.train_batch_size(),
        torch.distributed.get_world_size(engine.get_sequence_parallel_group()),
        ds_groups._get_sequence_parallel_group() is engine.seq_parallel_group,
        ds_groups._get_sequence_parallel_rank(),
    )
    batches, losses = [], []
    for idx, targets in loader:  # the same samples on both ranks: they are one data-parallel replica
        batches.append((idx, targets))
        mine = split_sequence({"idx": idx, "targets": targets})
        loss = engine(mine["idx"], mine["targets"])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return facts, batches, losses, engine._core.full_params(engine.state)


def ranks(rank: int, world: int) -> dict:
    groups = ulysses.initialize_sequence_parallel(SP)
    result = {
        "groups": (groups.sp_ranks, groups.sp_rank, groups.dp_rank, groups.dp_size),
        "exchange": _exchange_checks(rank, groups),
        "attention": _attention_results(rank, groups),
    }
    facts, batches, facade_losses, facade_params = _facade_run(rank)
    result["facade"] = (facts, batches, facade_losses, facade_params)
    split = lambda batch: ulysses.split_sequence(batch, groups)  # noqa: E731
    result["functional"] = _functional_run(_gpt(SP), _gpt_config(SP, 1), batches, split)
    return result


def _reference_attention() -> dict:
    q, k, v = (_rand(B, T, H, D, seed=s).requires_grad_(True) for s in (10, 11, 12))
    y = LocalAttention(0.0)(q, k, v)
    (y * _rand(B, T, H, D, seed=13)).sum().backward()
    logits = _rand(T, B, 7, seed=14).requires_grad_(True)
    target = torch.arange(T * B).reshape(T, B) % 7
    losses = F.cross_entropy(logits.reshape(T * B, 7), target.reshape(-1), reduction="none").reshape(T, B)
    losses.mean().backward()
    return {
        "attention": (y.detach(), [q.grad, k.grad, v.grad]),
        "cross_entropy": (losses.detach(), logits.grad),
    }


def test_sequence_parallel_on_two_ranks_equals_one_process():
    both = spawn_ranks(ranks, SP, timeout=240)
    ref = _reference_attention()
    y_full, grads_full = ref["attention"]
    for rank, result in enumerate(both):
        assert result["groups"] == ((0, 1), rank, 0, 1)
        assert result["exchange"] == [], (rank, result["exchange"])
        chunk = slice(rank * T // SP, (rank + 1) * T // SP)
        y, grads = result["attention"]["batch_first"]
        torch.testing.assert_close(y, y_full[:, chunk], rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, grads_full):
            torch.testing.assert_close(got, want[:, chunk], rtol=1e-5, atol=1e-5)
        y, grads = result["attention"]["seq_first"]
        torch.testing.assert_close(y, y_full[:, chunk].transpose(0, 1), rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, grads_full):
            torch.testing.assert_close(got, want[:, chunk].transpose(0, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["attention"]["seq_first_batch_dim_1"], y, rtol=1e-6, atol=1e-6)
        losses, (logit_grad,) = result["attention"]["cross_entropy"]
        torch.testing.assert_close(losses, ref["cross_entropy"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logit_grad, ref["cross_entropy"][1][chunk], rtol=1e-5, atol=1e-6)
        total, (share,) = result["attention"]["weighted_loss"]  # (1*1 + 2*2) / 3, share w_r / 3
        assert float(total) == pytest.approx(5 / 3) and float(share) == pytest.approx((rank + 1) / 3)

    facts, batches, _, _ = both[0]["facade"]
    # dp 1 x sp 2: both ranks read the same samples, the batch triple counts one replica
    assert facts == (1, 2, 2, MICRO, 2, True, 0) and both[1]["facade"][0][-1] == 1
    for (i0, t0), (i1, t1) in zip(batches, both[1]["facade"][1]):
        assert torch.equal(i0, i1) and torch.equal(t0, t1)
    want_losses, want_params = _functional_run(_gpt(1), _gpt_config(1, 0), batches, lambda b: b)
    assert len(want_losses) == STEPS
    for rank, result in enumerate(both):
        for name in ("functional", "facade"):
            got = result[name]
            losses, params = (got[0], got[1]) if name == "functional" else (got[2], got[3])
            assert losses == pytest.approx(want_losses, rel=1e-5, abs=1e-5), (rank, name)
            for key, value in want_params.items():
                torch.testing.assert_close(
                    params[key], value, rtol=1e-5, atol=1e-5, msg=f"{rank} {name} {key}"
                )


@given(st.integers(1, 4), st.integers(1, 4))
def test_rank_layout_is_consecutive_blocks(sp: int, dp: int):
    blocks = ulysses.sequence_rank_layout(sp * dp, sp)
    assert sorted(r for block in blocks for r in block) == list(range(sp * dp))
    for i, block in enumerate(blocks):
        assert block == list(range(i * sp, (i + 1) * sp))  # data-parallel rank of each is i


def test_config_batch_triple_counts_data_parallel_replicas():
    cfg = Config.from_dict({"train_batch_size": 8, "sequence_parallel_size": 2}, world_size=4)
    assert (cfg.data_parallel_size, cfg.train_micro_batch_size_per_gpu) == (2, 4)
    assert Config.from_dict(cfg.to_dict(), world_size=4) == cfg
    ok = Config.from_dict(
        {"train_batch_size": 8, "sequence_parallel_size": 2, "data_parallel_size": 2}, world_size=4
    )
    assert ok.sequence_parallel_size == 2
    with pytest.raises(ConfigError, match="sequence_parallel_size = 3: must divide the world size 4"):
        Config.from_dict({"train_batch_size": 8, "sequence_parallel_size": 3}, world_size=4)
    with pytest.raises(ConfigError, match="data_parallel_size = 4"):
        Config.from_dict(
            {"train_batch_size": 8, "sequence_parallel_size": 2, "data_parallel_size": 4}, world_size=4
        )
    with pytest.raises(ConfigError, match="sequence_parallel_size = 0"):
        Config.from_dict({"train_batch_size": 8, "sequence_parallel_size": 0}, world_size=4)
    with pytest.warns(UserWarning, match="seq_parallel_communication_data_type"):
        Config.from_dict({"train_batch_size": 8, "seq_parallel_communication_data_type": "bf16"})


def test_bad_input_is_refused_clearly():
    from zerostep.core import sequence_parallel
    from zerostep.core.pipeline_engine import check_pipeline_features
    from zerostep.sequence.layer import DistributedAttention
    from zerostep.utils import groups as ds_groups

    with pytest.raises(ValueError, match="n_head=3 is not divisible by sequence_parallel_size=2"):
        GPT(GPTConfig(n_head=3, n_embd=12, sequence_parallel_size=2))
    with pytest.raises(ValueError, match="does not divide the world size 1"):
        ulysses.initialize_sequence_parallel(2)  # one process
    two = ulysses.SequenceGroups(2, 1, None, (0, 1), 1, 0)
    with pytest.raises(ValueError, match="sequence length 5 .* not divisible by sequence_parallel_size=2"):
        ulysses.split_sequence({"idx": torch.zeros(2, 5)}, two)
    cut = ulysses.split_sequence({"idx": torch.arange(8).reshape(2, 4), "n": torch.ones(2)}, two)
    assert cut["idx"].tolist() == [[2, 3], [6, 7]] and cut["n"].shape == (2,)
    attn = DistributedAttention(LocalAttention(0.0), None)
    q = torch.zeros(1, 2, 2, 1)
    with pytest.raises(ValueError, match="batch_dim_idx must be 0 or 1"):
        attn(q, q, q, batch_dim_idx=2)
    with pytest.raises(NotImplementedError, match="rotary_pos_emb"):
        attn(q, q, q, 0, (q, q))
    assert torch.equal(attn(q, q, q, 0), LocalAttention(0.0)(q, q, q))  # one process: no exchange
    with pytest.warns(UserWarning, match="sp_stream"):
        DistributedAttention(LocalAttention(0.0), None, sp_stream=object())
    cfg = Config.from_dict({"train_batch_size": 4, "sequence_parallel_size": 2}, world_size=2)
    with pytest.raises(NotImplementedError, match="sequence_parallel_size > 1 with pipeline"):
        check_pipeline_features(cfg)
    with pytest.raises(NotImplementedError, match="OneBitAdam optimizer"):
        sequence_parallel.check(cfg, "OneBitAdam")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sequence_parallel.check(cfg, "adamw")  # fp32: nothing to say
    bf16 = Config.from_dict(
        {"train_batch_size": 4, "sequence_parallel_size": 2, "bf16": {"enabled": True}}, world_size=2
    )
    with pytest.warns(UserWarning, match="DeepSpeed reduces sequence-parallel gradients in"):
        sequence_parallel.check(bf16, "adamw")
    # with AutoTP the sequence groups are strided by tp (slow 4-rank test); with an mpu: refused
    sp_tp = Config.from_dict(
        {"train_batch_size": 4, "sequence_parallel_size": 2, "tensor_parallel": {"autotp_size": 2}},
        world_size=2,
    )
    sequence_parallel.check(sp_tp, "adamw", over_the_world=False)
    with pytest.raises(NotImplementedError, match="sequence_parallel_size=2 with mpu=: not implemented"):
        sequence_parallel.check(cfg, "adamw", over_the_world=False)
    with pytest.raises(ValueError, match="n_head=2 is not divisible by sequence_parallel_size=2 x tensor_"):
        GPT(GPTConfig(n_head=2, n_embd=12, sequence_parallel_size=2, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="tensor-parallel size 2 needs torch.distributed"):
        ulysses.initialize_sequence_parallel(1, 2)
    with pytest.raises(KeyError, match="No sequence parallel group found"):
        ds_groups._get_sequence_parallel_group()
    assert ds_groups._get_sequence_parallel_world_size() == 1


def ranks_sp2_dp2(rank: int, world: int) -> dict:
    groups = ulysses.initialize_sequence_parallel(SP)
    facts, batches, losses, params = _facade_run(rank, stage=0, samples=2 * SAMPLES)  # 3 steps per replica
    split = lambda batch: ulysses.split_sequence(batch, groups)  # noqa: E731
    return {
        "facade": (facts, batches, losses, params),
        "zero3": _functional_run(_gpt(SP), _gpt_config(SP, 3), batches, split),
    }


@pytest.mark.skipif(
    os.environ.get("ZEROSTEP_SLOW_TESTS") != "1", reason="4 ranks: ~35 s; ZEROSTEP_SLOW_TESTS=1"
)
def test_sp2_dp2_on_four_ranks_equals_one_process():
    out = spawn_ranks(ranks_sp2_dp2, 2 * SP, timeout=600)
    facts = out[0]["facade"][0]
    assert facts[:4] == (2, 4, 2, 2 * MICRO)  # dp 2 x sp 2; the batch triple counts two replicas
    (b0, b1, b2, b3) = (result["facade"][1] for result in out)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(b0, b1)) and all(
        torch.equal(x[0], y[0]) for x, y in zip(b2, b3)
    )
    assert not torch.equal(b0[0][0], b2[0][0])  # the replicas read different samples
    whole = [(torch.cat([x[0], y[0]]), torch.cat([x[1], y[1]])) for x, y in zip(b0, b2)]
    want_losses, want_params = _functional_run(_gpt(1), _gpt_config(1, 0, 2 * MICRO), whole, lambda b: b)
    for rank, result in enumerate(out):
        for name, (losses, params) in [("facade", result["facade"][2:]), ("zero3", result["zero3"])]:
            if name == "facade":  # engine(x)'s loss is this replica's; the engine's metric averages replicas
                losses = [(a + b) / 2 for a, b in zip(out[0]["facade"][2], out[2]["facade"][2])]
            assert losses == pytest.approx(want_losses, rel=1e-5, abs=1e-5), (rank, name)
            for key, value in want_params.items():
                torch.testing.assert_close(
                    params[key], value, rtol=1e-5, atol=1e-5, msg=f"{rank} {name} {key}"
                )


TP = 2


def _sp_tp_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**GPT_CFG.__dict__, "sequence_parallel_size": SP, "tensor_parallel_size": TP}))


def _sp_tp_ranks(rank: int, world: int, batches: list) -> dict:
    """TP=2 x SP=2 on 4 ranks (one data-parallel replica): the groups, the functional API's GPT training
    at ZeRO-1 on the batches every rank reads whole and cuts to its sequence chunk, and the facade's
    (mesh_param=(1, 2), its own loader) at ZeRO-2."""
    import zerostep
    from zerostep.sequence import split_sequence

    config = {**_gpt_config(SP, 1), "tensor_parallel": {"autotp_size": TP}}
    model = _sp_tp_gpt()
    groups = ulysses.initialize_sequence_parallel(SP)
    split = lambda batch: ulysses.split_sequence(batch, groups)  # noqa: E731
    out = {"layout": (groups.sp_ranks, groups.sp_rank, groups.dp_size, groups.tp_size)}
    out["functional"] = _functional_run(model, config, batches, split)
    config = {**_gpt_config(SP, 2), "tensor_parallel": {"autotp_size": TP}}
    del config["sequence_parallel_size"]
    engine, *_ = zerostep.initialize(model=_sp_tp_gpt(), config=config, mesh_param=(1, SP), compile=False)
    out["facade_sizes"] = (engine.dp_world_size, engine.seq_dp_world_size, engine.train_batch_size())
    losses, read = [], []
    for idx, targets in engine.deepspeed_io(_dataset(MICRO * STEPS), num_local_io_workers=0):
        read.append((idx, targets))
        mine = split_sequence({"idx": idx, "targets": targets})
        loss = engine(mine["idx"], mine["targets"])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    out["facade"] = (read, losses, engine._core.full_params(engine.state))
    return out


@pytest.mark.skipif(os.environ.get("ZEROSTEP_SLOW_TESTS") != "1", reason="4 ranks: ~25 s")
def test_sequence_parallel_with_tensor_parallel_on_four_ranks_equals_one_process():
    tokens = _dataset(MICRO * STEPS).tensors
    batches = [(tokens[0][i : i + MICRO], tokens[1][i : i + MICRO]) for i in range(0, MICRO * STEPS, MICRO)]
    results = spawn_ranks(_sp_tp_ranks, 4, batches, timeout=400)
    want_losses, want_params = _functional_run(_gpt(1), _gpt_config(1, 0), batches, lambda b: b)
    facade_read = results[0]["facade"][0]
    facade_want = _functional_run(_gpt(1), _gpt_config(1, 0), facade_read, lambda b: b)
    for rank, out in enumerate(results):
        # sequence groups {0, 2} {1, 3}: strided by TP inside the one replica
        assert out["layout"] == ((rank % TP, rank % TP + TP), rank // TP, 1, TP)
        # one replica reads every sample; gradients reduce over the SP x DP group of 2 ranks
        assert out["facade_sizes"] == (1, SP, MICRO)
        read, facade_losses, facade_params = out["facade"]
        assert len(read) == STEPS and all(  # the loader's (shuffled) samples: the same on every rank
            torch.equal(a, b) for got, first in zip(read, facade_read) for a, b in zip(got, first)
        )
        for name, (losses, params), (ref_losses, ref_params) in (
            ("functional", out["functional"], (want_losses, want_params)),
            ("facade", (facade_losses, facade_params), facade_want),
        ):
            assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5), (rank, name)
            for key, value in ref_params.items():
                msg = f"{rank} {name} {key}"
                torch.testing.assert_close(params[key], value, rtol=1e-5, atol=1e-5, msg=msg)
