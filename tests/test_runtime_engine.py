"""The DeepSpeed facade (zerostep.runtime.engine): equal to the functional step, DeepSpeed's counters,
client optimizers and schedulers, live weights, checkpoints, bad input."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models import Net

import zerostep
import zerostep.core as zs
from zerostep.io import CheckpointError
from zerostep.parallel.launch import spawn_ranks
from zerostep.zero import GatheredParameters


def config(stage=0, mb=2, gas=2, clip=0.0, **extra):
    return {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "zero_optimization": {"stage": stage},
        **extra,
    }


def data(steps, rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 5, generator=g), torch.randn(rows, 1, generator=g)) for _ in range(steps)]


def facade_run(cfg, batches, mb, gas, rank=0, world=1, **kw):
    """DeepSpeed's loop over this rank's rows of each global batch; returns (engine, fp32 params)."""
    engine, _, _, _ = zerostep.initialize(model=Net(), config=cfg, compile=False, **kw)
    per_rank = mb * gas
    for x, y in batches:
        x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
        for i in range(gas):
            sl = slice(i * mb, (i + 1) * mb)
            loss = F.mse_loss(engine(x[sl]), y[sl])
            engine.backward(loss)
            engine.step()
    return engine, engine._core.full_params(engine.state)


def functional_run(cfg, batches, mb, gas, rank=0, world=1):
    engine = zs.initialize(Net(), cfg, loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]), compile=False)
    state = engine.init()
    per_rank = mb * gas
    for x, y in batches:
        state = engine.step(
            state, (x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank])
        )
    return engine.full_params(state)


def assert_close(a, b, rel=1e-6):
    for n in b:
        scale = b[n].abs().max().clamp_min(1e-3)
        assert (a[n] - b[n]).abs().max() <= rel * scale, n


@settings(max_examples=8)
@given(
    stage=st.integers(0, 3), mb=st.integers(1, 3), gas=st.integers(1, 3), clip=st.sampled_from([0.0, 0.05])
)
def test_micro_steps_equal_the_functional_step(stage, mb, gas, clip):
    cfg = config(stage, mb, gas, clip)
    batches = data(3, mb * gas)
    engine, got = facade_run(cfg, batches, mb, gas)
    assert_close(got, functional_run(cfg, batches, mb, gas))
    assert engine.global_steps == 3 and engine.micro_steps == 3 * gas
    assert engine.global_samples == 3 * mb * gas


def multi_rank_equivalence(rank, world):
    out = []
    for stage in (0, 1, 2, 3):
        cfg = config(stage, mb=2, gas=2, clip=0.05)
        batches = data(2, 2 * 2 * world)
        _, got = facade_run(cfg, batches, 2, 2, rank, world)
        want = functional_run(cfg, batches, 2, 2, rank, world)
        out.append(
            max(((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-3)).item() for n in want)
        )
    return out


def test_micro_steps_equal_the_functional_step_on_several_ranks():
    # 3 ranks (uneven shards); 2 ranks run the same micro-steps in test_deepspeed_scripts' 2-rank script
    for errors in spawn_ranks(multi_rank_equivalence, 3, timeout=240):
        assert max(errors) <= 1e-6, errors


def decay_groups(model):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    other = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0, "lr": 5e-3}]


@pytest.mark.parametrize("stage,client", [(0, "AdamW"), (3, "AdamW"), (2, "FusedAdam")])
def test_client_optimizer_groups_and_scheduler_equal_a_torch_loop(stage, client):
    cfg = {k: v for k, v in config(stage).items() if k != "optimizer"}
    batches = data(8, 2)

    ref = Net()
    ref_opt = torch.optim.AdamW(decay_groups(ref), lr=1e-2)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda it: 1.0 / (1 + it))
    for i, (x, y) in enumerate(batches):
        (F.mse_loss(ref(x), y) / 2).backward()  # GAS 2
        if i % 2 == 1:
            ref_opt.step()
            ref_opt.zero_grad()
            ref_sched.step()
        if i == 5:  # a script writing one group's lr: the next update uses it
            ref_opt.param_groups[1]["lr"] = 2e-2

    model = Net()
    if client == "FusedAdam":  # DeepSpeed's class: zerostep.ops' FusedAdam in AdamW mode is torch's AdamW
        opt = zerostep.ops.adam.FusedAdam(decay_groups(model), lr=1e-2, adam_w_mode=True)
    else:
        opt = torch.optim.AdamW(decay_groups(model), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 / (1 + it))
    engine, returned_opt, _, returned_sched = zerostep.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=cfg, compile=False
    )
    assert returned_sched is sched and returned_opt.param_groups is opt.param_groups
    for i, (x, y) in enumerate(batches):
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
        if i == 5:
            returned_opt.param_groups[1]["lr"] = 2e-2
    assert_close(engine._core.full_params(engine.state), dict(ref.named_parameters()))
    assert engine.get_lr() == [g["lr"] for g in ref_opt.param_groups]


def test_fp16_overflow_is_skipped_and_counted_as_deepspeed_does():
    cfg = config(0, fp16={"enabled": True, "initial_scale_power": 8})
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_max_lr": 1e-2}}
    batches = data(3, 4)
    batches[1] = (batches[1][0] * 1e6, batches[1][1])  # fp16 overflow in the second step
    engine, got = facade_run(cfg, batches, 2, 2)
    assert (engine.global_steps, engine.skipped_steps) == (3, 1)
    assert engine.lr_scheduler.last_batch_iteration == 1  # stepped after the 2 applied updates only
    assert engine.was_step_applied()  # the last step was a normal one
    assert engine.optimizer.cur_scale == 2.0**8  # hysteresis 2 absorbs one overflow, as DeepSpeed's
    want = functional_run(cfg, batches, 2, 2)
    assert_close(got, want, rel=1e-3)  # fp16 compute: both ran the same fp16 arithmetic


def test_config_scheduler_is_a_deepspeed_scheduler_object():
    cfg = config(0, gas=1)
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}}
    engine, opt, _, sched = zerostep.initialize(model=Net(), config=cfg, compile=False)
    from zerostep.optim import lr_schedule

    schedule = lr_schedule(cfg["scheduler"], 1e-2)
    assert sched.get_last_lr() == [schedule(-1)] == engine.get_lr()
    for x, y in data(3, 2):
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    assert sched.state_dict() == {"last_batch_iteration": 2}
    assert engine.get_lr() == [schedule(2)] and float(engine.state.metrics.lr) == pytest.approx(schedule(1))


def test_gradient_accumulation_boundary_can_be_set_by_hand():
    cfg = config(0, gas=3)
    engine, *_ = zerostep.initialize(model=Net(), config=cfg, compile=False)
    ((x, y),) = data(1, 2)
    engine.set_gradient_accumulation_boundary(False)
    for _ in range(2):
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    assert engine.global_steps == 0
    engine.set_gradient_accumulation_boundary(True)
    engine.backward(F.mse_loss(engine(x), y))
    engine.step()
    assert engine.global_steps == 1


def test_live_weights_and_module_pass_through():
    model = Net()
    model.config = {"hidden": 7}  # a Hugging Face model's config attribute
    engine, *_ = zerostep.initialize(model=model, config=config(2), compile=False)
    assert engine.config == {"hidden": 7} and engine.head is model.head
    for x, y in data(2, 2):
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    engine.eval()
    assert not model.training
    trained = engine._core.full_params(engine.state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name  # the module holds the trained weights
    with torch.no_grad():
        assert torch.equal(engine(data(1, 2)[0][0]), model(data(1, 2)[0][0]))


def test_stage3_placeholders_gather_and_write_back():
    model = Net()
    engine, *_ = zerostep.initialize(model=model, config=config(3), compile=False)
    assert model.head.weight.numel() == 0 and tuple(model.head.weight.ds_shape) == (1, 7)
    for x, y in data(2, 2):
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    trained = engine._core.full_params(engine.state)
    with GatheredParameters(model.parameters()):
        assert torch.equal(model.head.weight, trained["head.weight"])
    assert model.head.weight.numel() == 0
    with GatheredParameters([model.head.bias], modifier_rank=0):
        model.head.bias.data.fill_(3.0)
    assert torch.equal(engine._core.full_params(engine.state)["head.bias"], torch.full((1,), 3.0))
    assert engine.module_state_dict()["head.bias"].item() == 3.0


def test_bad_calls_name_the_problem_and_change_nothing():
    engine, *_ = zerostep.initialize(model=Net(), config=config(0, gas=1), compile=False)
    ((x, y),) = data(1, 2)
    before = {n: t.clone() for n, t in engine._core.full_params(engine.state).items()}
    with pytest.raises(RuntimeError, match="without a backward"):
        engine.step()
    with pytest.raises(RuntimeError, match="without a forward"):
        engine.backward(F.mse_loss(Net()(x), y))
    engine(x)
    with pytest.raises(ValueError, match="does not depend on the model's parameters"):
        engine.backward((Net()(x) - y).pow(2).mean())
    loss = F.mse_loss(engine(x), y)  # a failed backward drops its forward: run it again
    with pytest.raises(ValueError, match="scalar"):
        engine.backward(torch.stack([loss, loss]))
    after = engine._core.full_params(engine.state)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert engine.global_steps == 0 and engine.micro_steps == 0

    other = Net()
    with pytest.raises(ValueError, match="not a parameter of the model"):
        zerostep.initialize(model=Net(), optimizer=torch.optim.AdamW(other.parameters()), config=config(0))

    class HomeMade(torch.optim.Optimizer):  # not torch.optim's: its math is unknown to zerostep
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

    with pytest.raises(TypeError, match="supported classes"):
        model = Net()
        zerostep.initialize(model=model, optimizer=HomeMade(model.parameters()), config=config(0))


def test_checkpoints_round_trip_counters_scheduler_and_client_state(tmp_path):
    cfg = config(1, gas=1)
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_max_lr": 1e-2}}
    engine, *_ = zerostep.initialize(model=Net(), config=cfg, compile=False)
    assert engine.load_checkpoint(tmp_path / "none") == (None, None)
    batches = data(4, 2)
    for x, y in batches[:2]:
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    engine.save_checkpoint(tmp_path, client_state={"epoch": 3, "note": "mid"})
    for x, y in batches[2:]:
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    want = engine._core.full_params(engine.state)

    resumed, *_ = zerostep.initialize(model=Net(), config=cfg, compile=False)
    path, client = resumed.load_checkpoint(tmp_path)
    assert path == str(tmp_path / "global_step2") and client == {"epoch": 3, "note": "mid"}
    assert (resumed.global_steps, resumed.global_samples, resumed.lr_scheduler.last_batch_iteration) == (
        2,
        4,
        1,
    )
    for x, y in batches[2:]:
        resumed.backward(F.mse_loss(resumed(x), y))
        resumed.step()
    assert_close(resumed._core.full_params(resumed.state), want, rel=0)


def test_training_data_becomes_deepspeeds_loader():
    xs, ys = torch.randn(10, 5), torch.randn(10, 1)
    dataset = torch.utils.data.TensorDataset(xs, ys)
    engine, _, loader, _ = zerostep.initialize(
        model=Net(),
        config=config(0, mb=2, gas=1, dataloader_drop_last=True),
        training_data=dataset,
        compile=False,
    )
    assert len(loader) == 5 and engine.training_dataloader is loader
    seen = 0
    for x, y in loader:
        assert x.shape == (2, 5)
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
        seen += len(x)
    assert seen == 10 and engine.global_steps == 5
    assert engine.tput_timer.global_step_count == 5


def test_any_torch_optim_client_runs_torchs_own_step():
    def groups(m):
        return [
            {"params": [p for n, p in m.named_parameters() if n.endswith("weight")], "weight_decay": 0.1},
            {"params": [p for n, p in m.named_parameters() if n.endswith("bias")], "lr": 3e-3},
        ]

    batches = data(4, 2)
    ref = Net()
    ref_opt = torch.optim.RMSprop(groups(ref), lr=1e-2, momentum=0.5)
    for x, y in batches:
        F.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    model = Net()
    opt = torch.optim.RMSprop(groups(model), lr=1e-2, momentum=0.5)
    cfg = {k: v for k, v in config(2, gas=1).items() if k != "optimizer"}
    engine, *_ = zerostep.initialize(model=model, optimizer=opt, config=cfg, compile=False)
    for x, y in batches:
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    assert_close(engine._core.full_params(engine.state), dict(ref.named_parameters()))


def test_load_checkpoint_migrates_a_deepspeed_run():
    import os

    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "deepspeed", "stage2_ws2")
    reference = torch.load(os.path.join(fixture, "reference.pt"), weights_only=True)
    cfg = config(1, gas=1)
    cfg["optimizer"]["params"]["weight_decay"] = 0.01
    engine, *_ = zerostep.initialize(model=Net(), config=cfg, compile=False)
    path, client = engine.load_checkpoint(fixture)
    assert path.endswith("global_step2") and client["epoch"] == 3
    assert engine.global_steps == 2
    assert_close(engine._core.full_params(engine.state), reference["params"])
    for x, y in data(1, 2):  # training goes on from DeepSpeed's state
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    assert engine.global_steps == 3


def frozen_first_layer() -> torch.nn.Module:
    model = Net()
    first = next(model.parameters())
    first.requires_grad_(False)
    return model


@pytest.mark.parametrize("stage", [0, 3])
def test_frozen_parameters_are_checkpointed_and_save_latest_false_leaves_latest(tmp_path, stage):
    engine, *_ = zerostep.initialize(model=frozen_first_layer(), config=config(stage, gas=1), compile=False)
    name, frozen = next(engine.module.named_parameters())
    assert not frozen.requires_grad
    x, y = data(1, 2)[0]
    engine.backward(F.mse_loss(engine(x), y))
    engine.step()
    engine.save_checkpoint(tmp_path, tag="first")
    engine.save_checkpoint(tmp_path, tag="second", save_latest=False)
    assert (tmp_path / "latest").read_text().strip() == "first"  # "second" is committed, not named
    engine.save_checkpoint(tmp_path, tag="bare", exclude_frozen_parameters=True, save_latest=False)

    resumed, *_ = zerostep.initialize(model=frozen_first_layer(), config=config(stage, gas=1), compile=False)
    resumed_frozen = dict(resumed.module.named_parameters())[name]
    with torch.no_grad():
        resumed_frozen.zero_()
    resumed.load_checkpoint(tmp_path, tag="bare")  # no frozen parameters written: left as they are
    assert not resumed_frozen.any()
    path, _ = resumed.load_checkpoint(tmp_path, tag="second")
    assert path == str(tmp_path / "second") and torch.equal(resumed_frozen, frozen)

    other = Net()  # the same name trainable here: refused, naming the parameter
    other_engine, *_ = zerostep.initialize(model=other, config=config(stage, gas=1), compile=False)
    with pytest.raises(CheckpointError, match="inp.weight"):
        other_engine.load_checkpoint(tmp_path, tag="second")
