"""Pipeline engine: pp=1 against zerostep's engine in process; pp=2 on 2 gloo ranks against one process
(every schedule, tied layers, clipping, the DeepSpeed facade, checkpoints saved at pp=2 and loaded at
pp=1, bad input), and a rank failing mid-schedule."""

import os
import time

import pipeline_models as pm
import pytest
import torch
from torch import nn

import zerostep
from zerostep.core import Engine
from zerostep.core.pipeline_engine import PipelineEngine
from zerostep.parallel.launch import spawn_ranks
from zerostep.pipe import PipelineModule

STEPS = 3
TIMEOUT = 5  # the process groups' (a peer that failed mid-schedule is noticed by then)
SCHEDULES = [
    ("gpipe", 1, "loop"),
    ("1f1b", 1, "loop"),
    ("interleaved_1f1b", 2, "loop"),
    ("looped_bfs", 2, "loop"),
    ("interleaved_zero_bubble", 2, "loop"),
    ("zbv_zero_bubble", 2, "v"),
    ("dualpipev", 2, "v"),
]


def _engine(num_stages, schedule="1f1b", per_rank=1, style="loop", tied=True, mb=2, stage=0):
    module = PipelineModule(
        pm.specs(tied),
        num_stages=num_stages,
        loss_fn=pm.mse,
        seed_layers=True,
        partition_method="uniform",
        stages_per_rank=per_rank,
        virtual_style=style,
    )
    return PipelineEngine(module, pm.config(schedule, stage, mb=mb))


def _train(engine, data, state=None):
    state = engine.init() if state is None else state
    history = []
    for batch in data:
        state = engine.step(state, batch)
        history.append(
            (float(state.metrics.loss), float(state.metrics.grad_norm), int(state.metrics.skipped))
        )
    return state, history


def _pipe_rank(rank, world, ckpt_dir):
    data = pm.batches(STEPS, 8)
    out = {}
    for schedule, per_rank, style in SCHEDULES:
        engine = _engine(2, schedule, per_rank, style)
        state, history = _train(engine, data)
        evaluated = float(engine.eval_step(state, data[0])) if style == "loop" else None
        out[schedule] = (history, engine.full_params(state), evaluated)
    # a checkpoint saved at pp=1 after two steps (by the test) resumes at pp=2
    engine = _engine(2)
    state, _, _ = engine.load(os.path.join(ckpt_dir, "pp1"), "two")
    state, history = _train(engine, data[2:], state)
    out["from_pp1"] = (history, engine.full_params(state))
    # a non-finite gradient on stage 0 only: both stages skip the step (one global finite check)
    before = engine.full_params(state)
    if rank == 0:
        engine._grad = lambda name, grad=engine._grad: grad(name) * float("inf")
    state = engine.step(state, data[0])
    after = engine.full_params(state)
    out["overflow"] = (int(state.metrics.skipped), all(torch.equal(before[n], after[n]) for n in before))
    # the DeepSpeed facade: train_batch over an iterator of (inputs, labels) micro-batches
    module = PipelineModule(
        pm.specs(), num_stages=2, loss_fn=pm.mse, seed_layers=True, partition_method="uniform"
    )
    engine, optimizer, _, scheduler = zerostep.initialize(
        model=module, config=pm.config("1f1b"), compile=False
    )
    micro = [(x[i : i + 2], y[i : i + 2]) for x, y in data[:2] for i in range(0, 8, 2)]
    it = iter(micro)
    losses = [float(engine.train_batch(it)) for _ in range(2)]
    engine.save_checkpoint(ckpt_dir, tag="two")
    loss, logits = engine.eval_batch(iter(micro[:4]), return_logits=True)
    out["facade"] = {
        "losses": losses,
        "first_last": (engine.is_first_stage(), engine.is_last_stage()),
        "eval": float(loss),
        "logits": None if logits is None else tuple(logits.shape),
        "returned": (optimizer, scheduler),
    }
    errors = {}
    for what, call in {
        "micro_batch": lambda: engine._core.step(engine.state, (data[0][0][:6], data[0][1][:6])),
        "no_loss_fn": lambda: PipelineEngine(PipelineModule(pm.specs(), num_stages=2), pm.config()),
        "forward": lambda: engine(data[0][0]),
    }.items():
        try:
            call()
            errors[what] = None
        except Exception as e:  # noqa: BLE001 - the message is checked by the test
            errors[what] = f"{type(e).__name__}: {e}"
    out["errors"] = errors
    # a rank failing mid-schedule: the other fails at the groups' timeout instead of hanging
    if rank == 1:
        engine.module.loss_fn = _broken_loss
    started = time.monotonic()
    try:
        engine.train_batch(iter(micro))
        failed = None
    except Exception as e:  # noqa: BLE001
        failed = f"{type(e).__name__}: {e}"
    out["failure"] = (failed, time.monotonic() - started)
    try:
        engine.train_batch(iter(micro))
    except RuntimeError as e:
        out["after_failure"] = str(e)
    # the failed rank waits for the other's failure, so both reach the spawn's closing barrier together
    done = os.path.join(ckpt_dir, "rank0_failed")
    if rank == 0:
        open(done, "w").close()
    deadline = time.monotonic() + 4 * TIMEOUT
    while not os.path.exists(done) and time.monotonic() < deadline:
        time.sleep(0.05)
    return out


def _broken_loss(output, target):
    raise RuntimeError("loss exploded on purpose")


def test_pp1_equals_zerosteps_engine(tmp_path):
    """One stage: the pipeline engine's update is zerostep's (same loss, norm, parameters)."""
    data = pm.batches(STEPS, 8)
    engine = _engine(1, tied=False)
    state, history = _train(engine, data)
    torch.manual_seed(0)
    reference = PipelineModule(pm.specs(False), num_stages=1, seed_layers=True)
    layers = [getattr(reference, str(i), None) or f for i, f in enumerate(reference.funcs_of(0, 10))]
    model = nn.Sequential(*layers)
    config = {k: v for k, v in pm.config().items() if k != "pipeline"}
    core = Engine(
        model,
        zerostep.core.Config.from_dict(config),
        loss_fn=lambda m, b: pm.mse(m(b[0]), b[1]),
        compile=False,
    )
    core_state = core.init()
    for batch in data:
        core_state = core.step(core_state, batch)
    assert history[-1][0] == pytest.approx(float(core_state.metrics.loss), rel=1e-6)
    assert history[-1][1] == pytest.approx(float(core_state.metrics.grad_norm), rel=1e-6)
    ours, theirs = engine.full_params(state), core.full_params(core_state)
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2 x 4 = 8"):
        engine.step(state, (data[0][0][:7], data[0][1][:7]))
    assert isinstance(zerostep.core.initialize(engine.module, pm.config(), compile=False), PipelineEngine)
    # a tag saved again replaces the first; `latest` names it; parameters only on request
    engine.save(state, tmp_path, "t", client_state={"epoch": 1})
    engine.save(state, tmp_path, "t", client_state={"epoch": 2})
    loaded, client, _ = engine.load(tmp_path)
    assert client == {"epoch": 2} and int(loaded.step) == STEPS
    fresh, _, _ = engine.load(tmp_path, "t", load_optimizer_states=False)
    assert int(fresh.step) == 0
    for name, value in engine.full_params(fresh).items():
        torch.testing.assert_close(value, ours[name])
    assert sorted(os.listdir(tmp_path)) == ["latest", "t"]
    with pytest.raises(ValueError, match="pipeline.stages = 3"):
        PipelineEngine(engine.module, {**pm.config(), "pipeline": {"stages": 3}})
    with pytest.raises(zerostep.ConfigError, match="pipeline.schedule"):
        PipelineEngine(engine.module, {**pm.config(), "pipeline": {"schedule": "bfs"}})
    with pytest.raises(ValueError, match="stages_per_rank"):
        PipelineEngine(engine.module, pm.config("zbv_zero_bubble"))
    with pytest.raises(NotImplementedError, match="torch_autocast, progressive_layer_drop"):
        PipelineEngine(
            engine.module,
            {**pm.config(), "torch_autocast": {"enabled": True}, "progressive_layer_drop": {"enabled": True}},
        )
    with pytest.warns(UserWarning, match="wall_clock_breakdown has no effect with pipeline"):
        PipelineEngine(engine.module, {**pm.config(), "wall_clock_breakdown": True})


def test_pp2_equals_one_process(tmp_path):
    data = pm.batches(STEPS, 8)
    reference = _engine(1)
    ref_state, ref_history = _train(reference, data)
    assert max(norm for _, norm, _ in ref_history) > 0.05  # clipping (0.05) is active
    ref_params = reference.full_params(ref_state)
    ref_eval = float(reference.eval_step(ref_state, data[0]))
    saver = _engine(1)
    saver.save(_train(saver, data[:2])[0], tmp_path / "pp1", "two")
    results = spawn_ranks(_pipe_rank, 2, str(tmp_path), timeout=240, collective_timeout=TIMEOUT)
    for rank, out in enumerate(results):
        for schedule, _, _ in SCHEDULES:
            history, params, evaluated = out[schedule]
            for (loss, norm, skipped), (ref_loss, ref_norm, _) in zip(history, ref_history):
                assert loss == pytest.approx(ref_loss, rel=1e-5), schedule
                assert norm == pytest.approx(ref_norm, rel=1e-5), schedule
                assert skipped == 0
            assert params, schedule
            for name, value in params.items():  # this rank's stage(s), tied copies included
                torch.testing.assert_close(
                    value, ref_params[name], rtol=1e-5, atol=1e-6, msg=f"{schedule} {name}"
                )
            assert evaluated is None or evaluated == pytest.approx(ref_eval, rel=1e-5)
        history, params = out["from_pp1"]
        assert history[0][0] == pytest.approx(ref_history[2][0], rel=1e-5)
        for name, value in params.items():
            torch.testing.assert_close(
                value, ref_params[name], rtol=1e-5, atol=1e-6, msg=f"from pp=1: {name}"
            )
        assert out["overflow"] == (1, True)  # skipped, nothing written, on both stages
        facade = out["facade"]
        assert facade["losses"] == pytest.approx([h[0] for h in ref_history[:2]], rel=1e-5)
        assert facade["first_last"] == (rank == 0, rank == 1)
        assert facade["logits"] == ((8, pm.WIDTH) if rank == 1 else None)
        assert facade["returned"] == (None, None)
        errors = out["errors"]
        assert "2 x 4 = 8" in errors["micro_batch"]
        assert "loss_fn" in errors["no_loss_fn"]
        assert "Only train_batch()" in errors["forward"]
        failed, seconds = out["failure"]
        assert failed is not None and seconds < TIMEOUT + 5, out["failure"]
        assert ("loss exploded on purpose" in failed) == (rank == 1)
        assert "stopped when a step failed mid-schedule" in out["after_failure"]
    # stage 0's and stage 1's names together are the whole model, the tied module on both
    names = set(results[0]["1f1b"][1]) | set(results[1]["1f1b"][1])
    assert names == set(ref_params)
    assert (
        "tied_modules.emb.weight" in results[0]["1f1b"][1]
        and "tied_modules.emb.weight" in results[1]["1f1b"][1]
    )
    # the checkpoint saved at pp=2 after two steps resumes at pp=1 and matches the uninterrupted run
    one = _engine(1)
    state, client, _ = one.load(tmp_path, "two")
    assert int(state.step) == 2
    state, history = _train(one, data[2:], state)
    assert history[0][0] == pytest.approx(ref_history[2][0], rel=1e-5)
    for name, value in one.full_params(state).items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-5, atol=1e-6, msg=name)
    assert sorted(os.listdir(tmp_path / "two")) == ["pipeline.json", "stage_00.msgpack", "stage_01.msgpack"]
    assert (tmp_path / "latest").read_text() == "two"


def _pipe_dp_rank(rank, world, ckpt_dir):
    engine = _engine(2, stage=1)  # 2 stages x 2 data-parallel ranks, ZeRO-1 on each stage's pair
    data = pm.batches(STEPS, 16)
    r = engine.mesh.dp_rank
    state, history = _train(engine, [(x[8 * r : 8 * r + 8], y[8 * r : 8 * r + 8]) for x, y in data])
    engine.save(state, ckpt_dir, "dp")
    return history, engine.full_params(state)


@pytest.mark.skipif(
    os.environ.get("ZEROSTEP_SLOW_TESTS") != "1", reason="4 ranks: ~40 s; ZEROSTEP_SLOW_TESTS=1"
)
def test_pp2_dp2_zero1_equals_one_process(tmp_path):
    data = pm.batches(STEPS, 16)
    reference = _engine(1, mb=4)  # one process: the same 16 rows per step in 4 micro-batches of 4
    ref_state, ref_history = _train(reference, data)
    ref_params = reference.full_params(ref_state)
    for history, params in spawn_ranks(_pipe_dp_rank, 4, str(tmp_path), timeout=300):
        flat = [v for h in history for v in h[:2]]
        assert flat == pytest.approx([v for h in ref_history for v in h[:2]], rel=1e-5)
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=1e-5, atol=1e-6, msg=name)
    one, _, _ = reference.load(tmp_path, "dp")  # saved at pp=2 x dp=2, loaded at pp=1 x dp=1
    for name, value in reference.full_params(one).items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-5, atol=1e-6, msg=name)
