"""engine.save / engine.load: round trips, resharding across world sizes and stages, model mismatch."""

from __future__ import annotations

import dataclasses
import os

import optree
import pytest
import torch
from models import Net, mse
from torch import nn

from zerostep.core import Config, ConsumedStateError, initialize
from zerostep.core.cli import main as cli_main
from zerostep.core.state import is_consumed
from zerostep.io import CheckpointError, PytreeReader
from zerostep.parallel.launch import spawn_ranks

TB, STEPS, SPLIT = 6, 4, 2  # global batch (divisible by 1, 2, 3); save after SPLIT steps


def engine_for(stage: int, world_size: int, model=None, **extra):
    d = {
        "train_batch_size": TB,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3, "warmup_max_lr": 0.01}},
    }
    d.update(extra)
    return initialize(model or Net(), Config.from_dict(d, world_size=world_size), loss_fn=mse, compile=False)


def batches():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(TB, 5, generator=gen), torch.randn(TB, 1, generator=gen)) for _ in range(STEPS)]


def rank_rows(batch, rank, world_size):
    per = TB // world_size
    return tuple(t[rank * per : (rank + 1) * per] for t in batch)


def run_steps(engine, state, steps, rank, world_size):
    for b in steps:
        state = engine.step(state, rank_rows(b, rank, world_size))
    return state


def reference_params():
    engine = engine_for(0, 1)
    state = run_steps(engine, engine.init(), batches(), 0, 1)
    return engine.full_params(state)


BF16 = {"bf16": {"enabled": True}}


def save_after_split(rank, world_size, stage, path, bf16=False):
    engine = engine_for(stage, world_size, **(BF16 if bf16 else {}))
    state = run_steps(engine, engine.init(), batches()[:SPLIT], rank, world_size)
    engine.save(state, path, client_state={"epoch": 3})
    return True


def resume(rank, world_size, stage, path, into=False):
    engine = engine_for(stage, world_size)
    fresh = engine.init() if into else None
    state, client = engine.load(path, return_client_state=True, into=fresh)
    if into:  # filled in place: the same buffers, and the donated state is spent
        assert all(state.master[g] is fresh.master[g] for g in fresh.master) and is_consumed(fresh)
    assert client == {"epoch": 3}
    assert int(state.step) == SPLIT
    state = run_steps(engine, state, batches()[SPLIT:], rank, world_size)
    return engine.full_params(state)


def save_all(rank, world_size, root, stages):
    for stage in stages:
        save_after_split(rank, world_size, stage, os.path.join(root, f"w{world_size}s{stage}"))
    return True


def resume_all(rank, world_size, loads):
    return [resume(rank, world_size, *load) for load in loads]


def assert_close_params(got, want):
    for name, p in want.items():
        err = float((got[name] - p).abs().max() / p.abs().max())
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def test_round_trip_in_one_process(tmp_path):
    want = reference_params()
    for stage in (0, 3):
        save_after_split(0, 1, stage, tmp_path / f"s{stage}")
        assert_close_params(resume(0, 1, stage, tmp_path / f"s{stage}"), want)
    saved = sorted(os.listdir(tmp_path / "s0"))
    assert "latest" in saved and f"global_step{SPLIT}" in saved


def save_then_resume(rank, world_size, root, stages, loads):
    save_all(rank, world_size, root, stages)
    return resume_all(rank, world_size, loads)


def test_reshard_matrix_across_world_sizes_and_stages(tmp_path):
    root = str(tmp_path)
    want = reference_params()
    # world size 1 saves stages 0 and 2; world size 3 saves stage 2; world size 2 saves stages 1 and 3;
    # each is loaded at another world size and stage, into new memory or in place (True). Two spawns:
    # a spawn saves, then loads what the earlier ones saved.
    save_all(0, 1, root, (0, 2))
    at3 = spawn_ranks(save_then_resume, 3, root, (2,), [(1, f"{root}/w1s2", True)], timeout=180)
    loads = [(3, f"{root}/w1s0", True), (0, f"{root}/w3s2")]
    at2 = spawn_ranks(save_then_resume, 2, root, (1, 3), loads, timeout=180)
    at1 = resume_all(0, 1, [(2, f"{root}/w2s3", True), (0, f"{root}/w3s2"), (3, f"{root}/w2s1", True)])
    for per_rank in (at2, at3, [at1]):
        for results in per_rank:
            for params in results:
                assert_close_params(params, want)


def flip_byte_in(path, leaf: str) -> None:
    """Damage one byte in the middle of tensor ``leaf``'s payload in the checkpoint file ``path``."""
    with PytreeReader(path) as reader:
        offset, n = reader.records[reader.paths[leaf]].extents[0]
    raw = bytearray(path.read_bytes())
    raw[offset + n // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def leaves_of(state):
    return [t.clone() for t in optree.tree_leaves(state)]


def same_leaves(before, state):
    pairs = zip(before, optree.tree_leaves(state), strict=True)
    return all(torch.equal(a, b) or bool(a.isnan().all() and b.isnan().all()) for a, b in pairs)


def test_load_into_a_state_reuses_its_buffers_and_leaves_it_whole_on_a_damaged_checkpoint(tmp_path):
    save_after_split(0, 1, 2, tmp_path)
    engine = engine_for(2, 1)
    want = engine.load(tmp_path)
    fresh = engine.init()
    exp_avg = [t for t in optree.tree_leaves(fresh.opt_state) if t.dim() == 1 and t.numel() > 1]
    loaded = engine.load(tmp_path, into=fresh)
    assert all(loaded.master[g] is fresh.master[g] for g in fresh.master)
    assert exp_avg and all(any(t is u for u in optree.tree_leaves(loaded.opt_state)) for t in exp_avg)
    assert same_leaves(leaves_of(want), loaded)
    with pytest.raises(ConsumedStateError, match="was loaded into from .* use that one"):
        engine.step(fresh, batches()[0])
    loaded = engine.step(loaded, batches()[SPLIT])  # and training goes on from the loaded state

    # a flipped byte in a flat leaf, then in a small one: the load raises before writing, and the
    # state stays whole and usable
    shard = tmp_path / f"global_step{SPLIT}" / "rank_00000.msgpack"
    original = shard.read_bytes()
    for leaf in ("opt_state/2/blocks.0", "scaler/scale"):
        flip_byte_in(shard, leaf)
        before = leaves_of(loaded)
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            engine.load(tmp_path, into=loaded)
        assert same_leaves(before, loaded) and not is_consumed(loaded)
        shard.write_bytes(original)
    engine.step(loaded, batches()[SPLIT])


def test_load_into_refuses_a_state_of_another_engine_before_reading(tmp_path):
    save_after_split(0, 1, 2, tmp_path)
    engine = engine_for(2, 1)
    others = {
        "master 'blocks.0' is torch.float32 \\[112\\]": engine_for(2, 1, model=Net(hidden=9)),
        "the state's parameters are sharded, this engine's \\(stage 2\\) are whole": engine_for(3, 1),
        "optimizer state is not": engine_for(2, 1, optimizer={"type": "SGD", "params": {"momentum": 0.9}}),
        "parameters '<root>' are torch.float32 \\[96\\] \\(the master itself\\), want torch.bfloat16": None,
    }
    for message, other in others.items():
        if other is None:  # an fp32 state into a bf16 engine of the same model
            engine, other = engine_for(2, 1, **BF16), engine
        state = other.init()
        before = leaves_of(state)
        with pytest.raises(ValueError, match=message):
            engine.load(tmp_path, into=state)
        assert same_leaves(before, state) and not is_consumed(state)


def damaged_rank_load(rank, world_size, stage, path):
    engine = engine_for(stage, world_size, **BF16)
    into = engine.init(seed=5)
    before = leaves_of(into)
    try:
        engine.load(path, into=into)
        error = None
    except CheckpointError as e:
        error = str(e)
    return error, same_leaves(before, into), is_consumed(into)


def save_stages(rank, world_size, root, stages):
    for stage in stages:
        save_after_split(rank, world_size, stage, os.path.join(root, f"s{stage}"), True)
    return True


def damaged_rank_loads(rank, world_size, root, stages):
    return [damaged_rank_load(rank, world_size, stage, os.path.join(root, f"s{stage}")) for stage in stages]


def test_a_shard_damaged_on_one_rank_leaves_every_rank_untouched(tmp_path):
    stages = (2, 3)  # one spawn saves both and one loads both (each spawn costs seconds)
    spawn_ranks(save_stages, 2, str(tmp_path), stages, timeout=120)
    for stage in stages:
        flip_byte_in(tmp_path / f"s{stage}" / f"global_step{SPLIT}" / "rank_00001.msgpack", "master/blocks.0")
    rank0, rank1 = spawn_ranks(damaged_rank_loads, 2, str(tmp_path), stages, timeout=120)
    for (e0, whole0, consumed0), (e1, whole1, consumed1) in zip(rank0, rank1):
        assert "another rank could not read its part" in e0 and "checksum mismatch" in e1
        assert whole0 and whole1 and not consumed0 and not consumed1


def test_bf16_load_into_rebuilds_the_compute_copy(tmp_path):
    save_after_split(0, 1, 3, str(tmp_path), bf16=True)
    engine = engine_for(3, 1, **BF16)
    want = engine.load(tmp_path)
    state = engine.init(seed=5)
    params = dict(state.params.flats)
    loaded = engine.load(tmp_path, into=state)
    assert all(loaded.params.flats[g] is params[g] for g in params)
    assert same_leaves(leaves_of(want), loaded)


def test_params_only_load_for_fine_tuning(tmp_path):
    save_after_split(0, 1, 2, tmp_path)
    engine = engine_for(1, 1)
    state = engine.load(tmp_path, load_optimizer_states=False)
    assert int(state.step) == 0
    ref = engine_for(0, 1)
    ref_state = run_steps(ref, ref.init(), batches()[:SPLIT], 0, 1)
    assert_close_params(engine.full_params(state), ref.full_params(ref_state))
    into = engine.init()
    in_place = engine.load(tmp_path, load_optimizer_states=False, into=into)
    assert all(in_place.master[g] is into.master[g] for g in into.master) and is_consumed(into)
    assert all(not t.any() for t in optree.tree_leaves(in_place.opt_state))  # a fresh AdamW state
    assert_close_params(engine.full_params(in_place), ref.full_params(ref_state))


def test_bf16_state_loads_as_fp32_and_back(tmp_path):
    engine = engine_for(2, 1, bf16={"enabled": True})
    state = run_steps(engine, engine.init(), batches()[:SPLIT], 0, 1)
    engine.save(state, tmp_path)
    fp32 = engine_for(0, 1)
    loaded = fp32.load(tmp_path)
    assert_close_params(fp32.full_params(loaded), engine.full_params(state))


def test_a_different_model_is_rejected_naming_the_mismatch(tmp_path):
    save_after_split(0, 1, 0, tmp_path)
    other = engine_for(0, 1, model=Net(hidden=9))
    with pytest.raises(
        CheckpointError, match=r"inp.weight: checkpoint shape \(7, 5\) vs model shape \(9, 5\)"
    ):
        other.load(tmp_path)


def test_async_save_and_keep_last(tmp_path):
    engine = engine_for(0, 1)
    state = engine.init()
    for i, b in enumerate(batches()):
        state = engine.step(state, b)
        handle = engine.save(state, tmp_path, keep_last=2, async_save=True)
        if i == 1:
            handle.wait()
    handle.wait()
    tags = sorted(t for t in os.listdir(tmp_path) if t.startswith("global_step"))
    assert tags == ["global_step3", "global_step4"]
    assert (tmp_path / "latest").read_text().strip() == "global_step4"
    loaded = engine.load(tmp_path)
    assert_close_params(engine.full_params(loaded), engine.full_params(state))


def test_cli_inspect_and_export(tmp_path, capsys):
    save_after_split(0, 1, 1, tmp_path / "ck")
    assert cli_main(["checkpoint", "inspect", str(tmp_path / "ck")]) == 0
    shown = capsys.readouterr().out
    assert f"global_step{SPLIT}" in shown and "master" in shown and "world size 1, ZeRO stage 1" in shown
    assert "blocks.0.0.weight: [7, 7]" in shown
    out = tmp_path / "model.safetensors"
    assert cli_main(["checkpoint", "export", str(tmp_path / "ck"), str(out)]) == 0
    from safetensors.torch import load_file

    weights = load_file(str(out))
    engine = engine_for(1, 1)
    full = engine.full_params(engine.load(tmp_path / "ck"))
    assert set(weights) == set(full)
    assert all(torch.equal(weights[n], full[n]) for n in full)


def seq_round_trip(rank, world_size, path):
    """nn.Sequential roots name their groups "0", "1", ...: optimizer-state paths like "1/2" must
    still file exp_avg["2"] under group "2"."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 1))

    cfg = {"train_batch_size": TB, "zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW"}}
    engine = initialize(make(), Config.from_dict(cfg, world_size=world_size), loss_fn=mse, compile=False)
    state = run_steps(engine, engine.init(), batches()[:SPLIT], rank, world_size)
    engine.save(state, path)
    loaded = engine.load(path)
    import optree

    pairs = zip(optree.tree_leaves(state.opt_state), optree.tree_leaves(loaded.opt_state))
    return all(torch.equal(a, b) for a, b in pairs)


def test_optimizer_state_of_a_sequential_model_round_trips_on_two_ranks(tmp_path):
    assert spawn_ranks(seq_round_trip, 2, str(tmp_path), timeout=120) == [True, True]


def test_a_non_train_state_checkpoint_is_rejected(tmp_path):
    from zerostep.io import save_checkpoint

    save_checkpoint(tmp_path, "other", {"w": torch.zeros(3)}, meta={"format": "something-else"})
    with pytest.raises(CheckpointError, match="not a zerostep train state"):
        engine_for(0, 1).load(tmp_path)


OTHER_OPTIMIZERS = {
    "sgd": {"type": "SGD", "params": {"momentum": 0.9}},
    "lion": {"type": "Lion"},
    "adagrad": {"type": "Adagrad"},
    "lamb": {"type": "Lamb"},
    "adam": {"type": "Adam", "params": {"adam_w_mode": False, "weight_decay": 0.01}},
}


def test_a_checkpoint_of_another_optimizer_is_refused_unless_params_only(tmp_path):
    save_after_split(0, 1, 1, tmp_path)  # AdamW
    for name, block in OTHER_OPTIMIZERS.items():
        engine = engine_for(1, 1, optimizer=block)
        message = f"saved with optimizer 'adamw', this engine's optimizer is '{name}'"
        with pytest.raises(CheckpointError, match=message):
            engine.load(tmp_path)
        into = engine.init()
        with pytest.raises(CheckpointError, match=message):
            engine.load(tmp_path, into=into)
        assert not is_consumed(into)
        state = engine.load(tmp_path, load_optimizer_states=False)  # fine-tuning with another optimizer
        assert int(state.step) == 0
        engine.step(state, batches()[0])
    # the same optimizer spelled differently loads: "Adam" is AdamW unless adam_w_mode is false, and
    # Adam without weight decay is AdamW's update over the same moments
    want = engine_for(1, 1).load(tmp_path)
    for block in ({"type": "Adam"}, {"type": "adam", "params": {"adam_w_mode": False}}):
        got = engine_for(1, 1, optimizer=block).load(tmp_path)
        assert same_leaves(leaves_of(want.opt_state), got.opt_state)
    adam = tmp_path / "adam"
    engine = engine_for(1, 1, optimizer=OTHER_OPTIMIZERS["adam"])
    engine.save(run_steps(engine, engine.init(), batches()[:1], 0, 1), adam)
    with pytest.raises(CheckpointError, match="Adam's L2 weight decay of 0.01 enters its moments"):
        engine_for(1, 1).load(adam)


def test_loss_scale_starts_at_the_configured_scale_unless_both_runs_are_fp16(tmp_path):
    fp16 = {"fp16": {"enabled": True, "initial_scale_power": 12, "hysteresis": 3}}
    save_after_split(0, 1, 2, tmp_path / "fp32")
    state = engine_for(2, 1, **fp16).load(tmp_path / "fp32")
    assert float(state.scaler.scale) == 4096.0 and int(state.scaler.hysteresis_left) == 3
    assert int(state.step) == SPLIT  # the rest of the state is the checkpoint's
    engine = engine_for(2, 1, **fp16)
    into = engine.load(tmp_path / "fp32", into=engine.init())
    assert float(into.scaler.scale) == 4096.0
    # an fp16 run's scaler is restored by an fp16 run, and dropped by a bf16 or fp32 one
    trained = run_steps(engine, engine.init(), batches()[:SPLIT], 0, 1)
    scaler = trained.scaler._replace(scale=torch.tensor(512.0), iteration=torch.tensor(7))
    trained = dataclasses.replace(trained, scaler=scaler)
    engine.save(trained, tmp_path / "fp16")
    again = engine_for(2, 1, **fp16).load(tmp_path / "fp16")
    assert float(again.scaler.scale) == 512.0 and int(again.scaler.iteration) == 7
    for extra in ({}, BF16):
        plain = engine_for(2, 1, **extra).load(tmp_path / "fp16")
        assert float(plain.scaler.scale) == 1.0 and int(plain.scaler.iteration) == 0


def loads_that_fail_on_one_rank(rank, world_size, path):
    import torch.distributed as dist

    from zerostep.io.checkpoint import LostContact

    save_after_split(rank, world_size, 2, path)
    engine = engine_for(2, world_size)
    errors = []
    try:  # rank 1 finds no such checkpoint: every rank's load fails, none waits in a collective
        engine.load(path, None if rank == 0 else "nope")
    except CheckpointError as e:
        errors.append(str(e))
    real = dist.all_reduce

    def vote_then_lose_contact(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("[gloo/transport/tcp/pair.cc] Connection closed by peer")

    dist.all_reduce = vote_then_lose_contact  # as when the vote's peer dies: a CheckpointError

    try:
        engine.load(path)
    except LostContact as e:
        errors.append(str(e))
    finally:
        dist.all_reduce = real
    return errors


def test_a_load_failing_on_one_rank_raises_checkpoint_errors_on_every_rank(tmp_path):
    (found, lost0), (missing, lost1) = spawn_ranks(loads_that_fail_on_one_rank, 2, str(tmp_path), timeout=120)
    assert "another rank could not read its part" in found
    assert f"{tmp_path / 'nope'}: checkpoint directory not found" in missing
    for lost in (lost0, lost1):
        assert "nothing was loaded: lost contact with the other ranks" in lost and "within 120 s" in lost


def test_the_manifest_records_only_plain_optimizer_hyperparameters():
    from zerostep.core.checkpointing import _plain_values

    hyper = {"lr": 1e-3, "betas": (0.9, 0.99), "nesterov": True, "fn": len, "big": 2**70, "mode": "x"}
    assert _plain_values(hyper) == {"lr": 1e-3, "betas": (0.9, 0.99), "nesterov": True, "mode": "x"}
