"""Loading checkpoints written by real DeepSpeed 0.19.8 (tests/fixtures/deepspeed, see its README) into
zerostep engines at other world sizes and stages, without DeepSpeed installed."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from models import Net, mse

from zerostep.core import Config, initialize
from zerostep.core.deepspeed_checkpoint import load_deepspeed_checkpoint
from zerostep.io import CheckpointError
from zerostep.io.deepspeed_format import is_deepspeed_checkpoint, read_deepspeed_checkpoint
from zerostep.parallel.launch import spawn_ranks

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "deepspeed")
CASES = [(stage, ws) for stage in range(4) for ws in (1, 2)]
CLIENT_STATE = {"epoch": 3, "note": "from deepspeed"}
MB = 2


def fixture(stage: int, ws: int) -> str:
    return os.path.join(FIXTURES, f"stage{stage}_ws{ws}")


def reference(stage: int, ws: int) -> dict:
    return torch.load(os.path.join(fixture(stage, ws), "reference.pt"), weights_only=True)


def engine_for(stage: int, world_size: int = 1, optimizer: dict | None = None, model=None):
    config = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "optimizer": optimizer or {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
    }
    return initialize(
        model or Net(), Config.from_dict(config, world_size=world_size), loss_fn=mse, compile=False
    )


def torch_continuation(ref: dict, batch) -> dict[str, torch.Tensor]:
    """One more torch.optim.AdamW step from DeepSpeed's weights and moments: what a resumed run must do."""
    model = Net()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ref["params"][n])
    opt = torch.optim.AdamW(model.parameters(), lr=ref["lr"], weight_decay=ref["weight_decay"])
    for n, p in model.named_parameters():
        opt.state[p] = {
            "step": torch.tensor(float(ref["step"])),
            "exp_avg": ref["exp_avg"][n].clone(),
            "exp_avg_sq": ref["exp_avg_sq"][n].clone(),
        }
    mse(model, batch).backward()
    opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_close(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert list(got) == list(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=tol, atol=tol, msg=n)


def next_batch(n: int):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, 5, generator=gen), torch.randn(n, 1, generator=gen)


@pytest.mark.parametrize("stage,ws", CASES)
def test_deepspeed_checkpoint_loads_into_one_rank_engine_and_resumes(stage, ws):
    ref = reference(stage, ws)
    engine = engine_for(stage)
    state, client = load_deepspeed_checkpoint(engine, fixture(stage, ws))
    assert client == CLIENT_STATE
    assert int(state.step) == 2 and int(state.skipped_steps) == 0
    assert_close(engine.full_params(state), ref["params"])
    for key in ("exp_avg", "exp_avg_sq"):  # DeepSpeed's own moments (reference.pt)
        for g, layout in engine.plan.layouts.items():
            got = layout.unflatten(getattr(state.opt_state, key)[g])
            for n in layout.names:
                torch.testing.assert_close(got[n], ref[key][n], rtol=1e-6, atol=1e-9, msg=f"{key} {n}")
    assert float(state.opt_state.count) == 2.0
    if stage < 3:  # the module sees the loaded weights (stage 3: placeholders, by design)
        assert_close({n: p.detach().float() for n, p in engine.model.named_parameters()}, ref["params"])
    batch = next_batch(MB)
    state = engine.step(state, batch)
    assert int(state.step) == 3
    assert_close(engine.full_params(state), torch_continuation(ref, batch), tol=1e-5)


def test_reader_consolidates_every_stage_to_deepspeeds_view():
    for stage, ws in CASES:
        ckpt = read_deepspeed_checkpoint(fixture(stage, ws))
        ref = reference(stage, ws)
        assert (ckpt.stage, ckpt.dp_world_size, ckpt.tag) == (stage, ws, "global_step2")
        assert (ckpt.global_steps, ckpt.skipped_steps, ckpt.global_samples) == (2, 0, 2 * MB * ws)
        assert ckpt.optimizer_type == "AdamW" and ckpt.optimizer_step == 2
        assert ckpt.param_groups[0]["lr"] == 0.01 and ckpt.client_state == CLIENT_STATE
        for key in ("params", "exp_avg", "exp_avg_sq"):
            assert_close(getattr(ckpt, key), ref[key], tol=1e-7)
        assert is_deepspeed_checkpoint(fixture(stage, ws))
        assert is_deepspeed_checkpoint(fixture(stage, ws), tag="global_step2")
        assert not is_deepspeed_checkpoint(fixture(stage, ws), tag="global_step9")
    assert not is_deepspeed_checkpoint(FIXTURES)


def _two_rank_loads(rank: int, world_size: int, cases: list) -> list:
    out = []
    for fixture_dir, stage in cases:
        engine = engine_for(stage, world_size)
        state, client = load_deepspeed_checkpoint(engine, fixture_dir)
        moments = {g: t.clone() for g, t in state.opt_state.exp_avg.items()}  # this rank's shard
        layouts = dict(engine.plan.layouts)
        params = engine.full_params(state)
        x, y = next_batch(MB * world_size)
        rows = slice(rank * MB, (rank + 1) * MB)
        state = engine.step(state, (x[rows], y[rows]))
        out.append((params, moments, layouts, client, int(state.step), engine.full_params(state)))
    return out


def test_deepspeed_checkpoints_load_into_two_rank_engines_of_other_stages():
    cases = [(fixture(2, 2), 3), (fixture(3, 1), 1)]  # ws2 stage 2 -> stage 3; ws1 stage 3 -> stage 1
    by_rank = spawn_ranks(_two_rank_loads, 2, cases, timeout=180, collective_timeout=60)
    for i, (stage, ws) in enumerate([(2, 2), (3, 1)]):
        ref = reference(stage, ws)
        after = torch_continuation(ref, next_batch(2 * MB))  # DeepSpeed averages over ranks
        for rank, results in enumerate(by_rank):
            params, moments, layouts, client, step, stepped = results[i]
            assert client == CLIENT_STATE and step == 3
            assert_close(params, ref["params"])
            for g, layout in layouts.items():
                want = layout.shard(layout.flatten({n: ref["exp_avg"][n] for n in layout.names}), rank)
                torch.testing.assert_close(moments[g], want, rtol=1e-6, atol=1e-9)
            assert_close(stepped, after, tol=1e-5)


def test_damaged_or_missing_files_raise_checkpoint_error_naming_them(tmp_path):
    src = fixture(2, 2)
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    victim = broken / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        read_deepspeed_checkpoint(broken)
    engine = engine_for(2)
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        load_deepspeed_checkpoint(engine, broken)
    victim.unlink()  # a rank's file gone: partition_count no longer matches
    with pytest.raises(CheckpointError, match="partition_count 2 but 1"):
        read_deepspeed_checkpoint(broken)
    with pytest.raises(CheckpointError, match="latest"):
        read_deepspeed_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="global_step9"):
        read_deepspeed_checkpoint(src, tag="global_step9")


def test_restricted_unpickler_refuses_code_and_maps_deepspeed_classes(tmp_path):
    tag_dir = tmp_path / "global_step1"
    tag_dir.mkdir()
    evil = tag_dir / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "hook": os.getcwd}, evil)  # a callable global: never resolved
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt.*refusing to load global"):
        read_deepspeed_checkpoint(tmp_path, tag="global_step1")
    ckpt = read_deepspeed_checkpoint(fixture(1, 1))
    assert ckpt.loss_scale == 1.0  # read from DeepSpeed's LossScaler, unpickled as a stand-in


def test_mismatched_model_or_optimizer_is_refused_before_anything_is_written():
    engine = engine_for(1, model=Net(hidden=8))
    with pytest.raises(
        CheckpointError, match=r"shapes differ: inp\.weight: checkpoint \(7, 5\), model \(8, 5\)"
    ):
        load_deepspeed_checkpoint(engine, fixture(1, 1))
    sgd = engine_for(0, optimizer={"type": "SGD", "params": {"lr": 0.1}})
    before = {n: p.detach().clone() for n, p in sgd.model.named_parameters()}
    with pytest.raises(CheckpointError, match="'sgd' optimizer"):
        load_deepspeed_checkpoint(sgd, fixture(0, 1))
    assert_close({n: p.detach() for n, p in sgd.model.named_parameters()}, before, tol=0)
    state, _ = load_deepspeed_checkpoint(sgd, fixture(0, 1), load_optimizer_states=False)
    assert_close(sgd.full_params(state), reference(0, 1)["params"])


def test_stage_0_moments_over_several_param_groups_are_refused_but_weights_load(tmp_path):
    from zerostep.io.deepspeed_format import load_deepspeed_file

    model = load_deepspeed_file(os.path.join(fixture(0, 1), "global_step2", "mp_rank_00_model_states.pt"))
    (group,) = model["optimizer"]["param_groups"]
    # as HF scripts split decay / no-decay: torch numbers the parameters group after group
    model["optimizer"]["param_groups"] = [{**group, "params": [0, 2]}, {**group, "params": [1, *range(3, 8)]}]
    (tmp_path / "global_step2").mkdir()
    torch.save(model, tmp_path / "global_step2" / "mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("global_step2")
    ckpt = read_deepspeed_checkpoint(tmp_path)
    assert ckpt.exp_avg is None and "2 param groups" in ckpt.moments_note
    engine = engine_for(0)
    with pytest.raises(
        CheckpointError, match="holds no Adam moments.*2 param groups records no parameter names"
    ):
        load_deepspeed_checkpoint(engine, tmp_path)
    state, client = load_deepspeed_checkpoint(engine, tmp_path, load_optimizer_states=False)
    assert client == CLIENT_STATE
    assert_close(engine.full_params(state), reference(0, 1)["params"])


def test_a_zerostep_checkpoint_is_not_taken_for_a_deepspeed_one(tmp_path):
    engine = engine_for(1)
    engine.save(engine.init(), tmp_path, tag="t1")
    assert not is_deepspeed_checkpoint(tmp_path)
    assert not is_deepspeed_checkpoint(tmp_path, tag="t1")
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint"):
        read_deepspeed_checkpoint(tmp_path)


@pytest.mark.parametrize("stage,ws", [(0, 1), (1, 1), (2, 1), (3, 2)])
def test_frozen_parameters_and_buffers_come_back(stage, ws):
    from fixtures.deepspeed.frozen_net import FrozenNet

    path = os.path.join(FIXTURES, f"frozen_stage{stage}_ws{ws}")
    ref = torch.load(os.path.join(path, "reference.pt"), weights_only=True)
    ckpt = read_deepspeed_checkpoint(path)
    # stage 0 records nothing about frozen parameters: the reader returns them with the rest
    frozen = {n: ckpt.params[n] for n in ref["frozen"]} if stage == 0 else ckpt.frozen_params
    assert_close(frozen, ref["frozen"], tol=0)
    assert_close(ckpt.buffers, ref["buffers"], tol=0)
    # a model whose frozen weight and buffer differ from the run's: the load must overwrite both
    engine = engine_for(min(stage, 2), model=FrozenNet(frozen_value=-1.0, scale=3.0))
    state, _ = load_deepspeed_checkpoint(engine, path)
    assert_close(engine.full_params(state), ref["params"])
    assert_close(
        {n: p.detach() for n, p in engine.model.named_parameters() if not p.requires_grad}, ref["frozen"]
    )
    assert_close(dict(engine.model.named_buffers()), ref["buffers"])
    batch = next_batch(MB)
    out = engine.eval_step(state, batch)
    model = FrozenNet()
    model.load_state_dict({**ref["params"], **ref["frozen"], **ref["buffers"]})
    torch.testing.assert_close(out, mse(model, batch), rtol=1e-6, atol=1e-7)
