"""zerostep.core.monitoring through the facade: CSV / TensorBoard events equal to the engine's metrics,
DeepSpeed's timer names and lines, no timers with wall_clock_breakdown off, the progress and speed lines."""

import csv
import importlib.util
import logging
import time

import pytest
import torch
import torch.nn.functional as F
from models import Net

import zerostep
from zerostep.core.monitoring import MonitorMaster, StepTimers, ThroughputTimer, format_timers, progress_line
from zerostep.core.monitoring.timers import GLOBAL_TIMERS, MICRO_TIMERS, WallClockTimers
from zerostep.errors import ConfigError


def config(gas=2, fp16=False, **extra):
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.0,
        "steps_per_print": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        **extra,
    }
    if fp16:
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return cfg


def run(cfg, steps, gas=2, seed=1, client_adamw=False):
    """DeepSpeed's loop; returns the engine and each optimizer step's (global_samples, loss, lr)."""
    model = Net()
    if client_adamw:
        cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
        engine, _, _, _ = zerostep.initialize(model=model, optimizer=opt, config=cfg, compile=False)
    else:
        engine, _, _, _ = zerostep.initialize(model=model, config=cfg, compile=False)
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        for _ in range(gas):
            x, y = torch.randn(2, 5, generator=g), torch.randn(2, 1, generator=g)
            engine.backward(F.mse_loss(engine(x), y))
            engine.step()
        m = engine.state.metrics
        seen.append((engine.global_samples, float(m.loss), engine.get_lr()[0]))
    return engine, seen


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_csv_monitor_rows_equal_the_engine_metrics(tmp_path):
    cfg = config(csv_monitor={"enabled": True, "output_path": str(tmp_path), "job_name": "job"})
    engine, seen = run(cfg, steps=3)
    job = tmp_path / "job"
    loss_rows = read_csv(job / "Train_Samples_train_loss.csv")
    lr_rows = read_csv(job / "Train_Samples_lr.csv")
    assert loss_rows[0] == ["step", "train_loss"] and lr_rows[0] == ["step", "lr"]
    assert [(int(s), float(v)) for s, v in loss_rows[1:]] == [(s, loss) for s, loss, _ in seen]
    assert [(int(s), float(v)) for s, v in lr_rows[1:]] == [(s, lr) for s, _, lr in seen]
    assert [s for s, _, _ in seen] == [4, 8, 12]  # x axis: samples, train_batch_size = 2 x 2
    assert not (job / "Train_Samples_loss_scale.csv").exists()  # fp32: no loss scale
    assert not (job / "Train_Samples_elapsed_time_ms_forward.csv").exists()  # timers off
    # the user's own scalars, as DeepSpeed's engine.monitor.write_events
    engine.monitor.write_events([("Eval/acc", 0.5, 12)])
    assert read_csv(job / "Eval_acc.csv") == [["step", "acc"], ["12", "0.5"]]


def test_fp16_loss_scale_and_timer_events(tmp_path):
    cfg = config(
        fp16=True,
        wall_clock_breakdown=True,
        csv_monitor={"enabled": True, "output_path": str(tmp_path), "job_name": "j"},
    )
    engine, seen = run(cfg, steps=2)
    rows = read_csv(tmp_path / "j" / "Train_Samples_loss_scale.csv")
    assert rows[0] == ["step", "loss_scale"] and [int(r[0]) for r in rows[1:]] == [4, 8]
    assert float(rows[-1][1]) == float(engine.state.scaler.scale)
    fwd = read_csv(tmp_path / "j" / "Train_Samples_elapsed_time_ms_forward.csv")
    assert [int(r[0]) for r in fwd[1:]] == [4, 8] and all(float(r[1]) > 0 for r in fwd[1:])


def test_timers_have_deepspeeds_names_and_fit_in_the_step(capsys):
    engine, _ = run(config(wall_clock_breakdown=True), steps=1)  # warm-up: global step 1, not printed
    capsys.readouterr()
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # global steps 2 and 3
        t0 = time.perf_counter()
        for _ in range(2):
            x, y = torch.randn(2, 5, generator=g), torch.randn(2, 1, generator=g)
            engine.backward(F.mse_loss(engine(x), y))
            engine.step()
        wall_ms = (time.perf_counter() - t0) * 1000
    timers = engine.get_wall_clock_timers()
    assert set(timers) == set(MICRO_TIMERS) | set(GLOBAL_TIMERS)
    assert all(v >= 0 for v in timers.values())
    # one window: forward + backward + step within the window's wall time; nesting as DeepSpeed's
    assert timers["fwd"] + timers["bwd"] + timers["step"] <= wall_ms
    assert timers["bwd_inner"] + timers["bwd_allreduce"] <= timers["bwd"] + 1e-6
    assert timers["fwd_microstep"] <= timers["fwd"] + 1e-6 and timers["bwd_allreduce"] > 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("time (ms)")]
    assert len(lines) == 2  # micro and global line at global step 2 only (steps_per_print = 2)
    assert lines[0].startswith("time (ms) | fwd_microstep: ") and " | bwd_allreduce_microstep: " in lines[0]
    assert lines[1].startswith("time (ms) | fwd: ") and lines[1].split(" | ")[-1].startswith("step: ")


def test_timers_off_creates_no_timer(monkeypatch):
    created = []
    original = WallClockTimers.__init__

    def spy(self, *a, **k):
        created.append(self)
        original(self, *a, **k)

    monkeypatch.setattr(WallClockTimers, "__init__", spy)
    engine, _ = run(config(), steps=2)
    assert engine.timers is None and created == [] and engine.get_wall_clock_timers() == {}
    assert type(engine._core._reducer).__name__ != "TimedReducer"


def test_progress_and_speed_lines(caplog):
    with caplog.at_level(logging.INFO, logger="zerostep.monitoring"):
        engine, _ = run(config(wall_clock_breakdown=True, steps_per_print=2), steps=4, client_adamw=True)
    messages = [r.getMessage() for r in caplog.records if r.name == "zerostep.monitoring"]
    progress = [m for m in messages if m.startswith("step=")]
    assert progress == [progress_line(s, 0, [0.01], [(0.8, 0.99)]) for s in (2, 4)]
    assert progress[0] == "step=2, skipped=0, lr=[0.01], mom=[(0.8, 0.99)]"
    # the speed line from global step 4 only: steps 1-2 are the throughput timer's warm-up (DeepSpeed's)
    speed = [m for m in messages if m.startswith("epoch=")]
    assert len(speed) == 1 and speed[0].startswith(
        "epoch=0/micro_step=8/global_step=4, RunningAvgSamplesPerSec="
    )
    assert "CurrSamplesPerSec=" in speed[0] and "MaxMemAllocated=" in speed[0]
    assert engine.tput_timer.avg_samples_per_sec() > 0
    engine.tput_timer.update_epoch_count()
    assert engine.tput_timer.epoch_count == 1 and engine.tput_timer.micro_step_count == 0


def test_throughput_timer_skips_warm_up_steps():
    lines = []
    timer = ThroughputTimer(batch_size=8, start_step=2, steps_per_output=2, logging_fn=lines.append)
    for _ in range(4):
        timer.start()
        time.sleep(0.01)
        timer.stop(global_step=True, report_speed=True)
    assert timer.timed_steps() == 2 and 0 < timer.avg_samples_per_sec() <= 8 / 0.01
    assert len(lines) == 1 and lines[0].startswith("epoch=0/micro_step=4/global_step=4,")


def test_step_timers_around_the_functional_step():
    timers = StepTimers("cpu", every=2)
    lines = []
    for step in (1, 2):
        with timers.timing("train_batch"):
            time.sleep(0.005)
        lines.append(timers.end_step(step))
    assert lines[0] is None and lines[1].startswith("time (ms) | train_batch: ")
    assert timers.as_dict()["train_batch"] >= 5.0
    assert format_timers({"fwd": 1.0, "bwd": 2.5}) == "time (ms) | fwd: 1.00 | bwd: 2.50"


@pytest.mark.parametrize("stage", [0, 3])
def test_the_functional_step_times_its_phases_within_its_own_wall_time(stage):
    import zerostep.core as zs

    cfg = config(wall_clock_breakdown=True, zero_optimization={"stage": stage})
    engine = zs.initialize(Net(), cfg, loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]), compile=False)
    state = engine.init()
    batch = (torch.randn(4, 5), torch.randn(4, 1))
    timers = StepTimers("cpu", every=1)
    timers.share(engine.timers)
    for step in (1, 2):
        t0 = time.perf_counter()
        with timers.timing("train_batch"):
            state = engine.step(state, batch)
        wall_ms = (time.perf_counter() - t0) * 1e3
        line = timers.end_step(step)
        phases = timers.as_dict()
        assert list(phases) == ["train_batch", "fwd_bwd", "bwd_allreduce", "step"], phases
        assert all(ms > 0 for ms in phases.values()) and line.startswith("time (ms) | train_batch: ")
        inner = phases["fwd_bwd"] + phases["bwd_allreduce"] + phases["step"]
        assert inner <= phases["train_batch"] <= wall_ms
    assert engine.wall_clock_timers() == {
        "train_batch": 0.0,
        "fwd_bwd": 0.0,
        "bwd_allreduce": 0.0,
        "step": 0.0,
    }
    quiet = zs.initialize(Net(), config(), loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]), compile=False)
    quiet.step(quiet.init(), batch)
    assert quiet.timers is None and quiet.wall_clock_timers() == {}


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tensorboard={"enabled": True, "output_path": str(tmp_path), "job_name": "tb"})
    engine, seen = run(cfg, steps=3)
    engine.monitor.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("Train/Samples/train_loss")]
    assert [s for s, _ in loss] == [s for s, _, _ in seen]
    assert [v for _, v in loss] == pytest.approx([v for _, v, _ in seen], rel=1e-6)
    assert [e.value for e in acc.Scalars("Train/Samples/lr")] == pytest.approx([lr for *_, lr in seen])


def test_missing_monitor_library_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n in ("tensorboard", "wandb") else real(n)
    )
    cfg = zerostep.core.Config.from_dict(config(tensorboard={"enabled": True}))
    with pytest.raises(ConfigError, match=r"tensorboard.*pip install 'zerostep\[monitor\]'"):
        MonitorMaster(cfg, rank=0)
    cfg = zerostep.core.Config.from_dict(config(wandb={"enabled": True}))
    with pytest.raises(ConfigError, match="wandb.*pip install wandb"):
        MonitorMaster(cfg, rank=0)
    assert MonitorMaster(cfg, rank=1).monitors() == []  # other ranks build nothing


def test_train_loop_monitoring_over_the_functional_engine(tmp_path, capsys):
    import zerostep.core as zs
    from zerostep.core.monitoring.train_loop import TrainMonitoring

    cfg = zs.Config.from_dict(
        config(
            gas=1,
            wall_clock_breakdown=True,
            csv_monitor={"enabled": True, "output_path": str(tmp_path), "job_name": "fn"},
        )
    )
    engine = zs.initialize(Net(), cfg, loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]), compile=False)
    state = engine.init()
    watch = TrainMonitoring(cfg, 0, torch.device("cpu"), tmp_path / "tb_default")
    g = torch.Generator().manual_seed(0)
    losses = []
    for i in range(4):
        with watch.timing():
            state = engine.step(state, (torch.randn(2, 5, generator=g), torch.randn(2, 1, generator=g)))
        watch.after_step(state, (i + 1) * cfg.train_batch_size)
        losses.append((2 * (i + 1), float(state.metrics.loss)))
    watch.close()
    rows = read_csv(tmp_path / "fn" / "Train_Samples_train_loss.csv")
    assert [(int(s), float(v)) for s, v in rows[1:]] == losses
    timed = read_csv(tmp_path / "fn" / "Train_Samples_elapsed_time_ms_train_batch.csv")
    assert len(timed) == 5 and all(float(v) > 0 for _, v in timed[1:])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("time (ms) | train_batch: ")]
    assert len(lines) == 2  # steps 2 and 4 (steps_per_print = 2)
    has_tb = importlib.util.find_spec("tensorboard") is not None
    assert (watch.tensorboard_dir == tmp_path / "tb_default") == has_tb
    if has_tb:
        assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb_default").iterdir())


def wandb_history(run_file):
    """History rows of an offline ``run-*.wandb`` file: wandb's record log (LevelDB log framing: 32 KiB
    blocks, 7-byte ``crc, length, kind`` headers, a 7-byte file header) of ``Record`` protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, part = run_file.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (length == 0 and kind == 0) or pos + 7 + length > len(data):  # end, or still being written
            break
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            records.append(part)
            part = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_events(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = zerostep.core.Config.from_dict(config(wandb={"enabled": True, "project": "zs-test"}))
    monitor = MonitorMaster(cfg, rank=0)
    monitor.write_events([("Train/Samples/lr", 0.1, 4), ("Train/Samples/lr", 0.2, 8)])
    monitor.close()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 20  # wandb's own service process writes the file after finish()
    while True:
        rows = [(int(r["_step"]), float(r["Train/Samples/lr"])) for r in wandb_history(run_file)]
        if len(rows) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rows == [(4, 0.1), (8, 0.2)]


def test_memory_breakdown_prints_each_ranks_memory(capsys, recwarn):
    engine, _ = run(config(memory_breakdown=True, steps_per_print=2), steps=2)
    assert engine._core.config.memory_breakdown
    assert not [w for w in recwarn if "memory_breakdown" in str(w.message)]  # no "has no effect" warning
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[rank 0] step=")]
    assert len(lines) == 1 and lines[0].startswith("[rank 0] step=2 memory:")
    rss_gb = float(lines[0].split("host RSS ")[1].split()[0])
    assert rss_gb > 0.01  # this interpreter with torch loaded holds well over 10 MB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a GPU")
def test_cuda_event_timers_measure_device_time():
    timers = WallClockTimers("cuda")
    with timers.timing("fwd"):
        torch.cuda._sleep(50_000_000)  # a kernel spinning ~tens of ms on the device
    ms = timers.elapsed(["fwd"])["fwd"]  # waits for the end event
    assert timers("fwd").use_events and ms > 5.0


def two_rank_monitoring(rank, world, out):
    """ZeRO-2 facade on 2 gloo ranks with CSV monitor and timers; returns what each rank saw."""
    cfg = config(
        wall_clock_breakdown=True,
        zero_optimization={"stage": 2},
        csv_monitor={"enabled": True, "output_path": out, "job_name": f"rank{rank}"},
    )
    engine, _, _, _ = zerostep.initialize(model=Net(), config=cfg, compile=False)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2 * 2):
        x, y = torch.randn(2, 5, generator=g), torch.randn(2, 1, generator=g)
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    return engine.monitor.monitors() != [], engine.get_wall_clock_timers(), float(engine.state.metrics.loss)


def test_rank_zero_writes_and_every_rank_times(tmp_path):
    from zerostep.parallel.launch import spawn_ranks

    (wrote0, timers0, loss0), (wrote1, timers1, _) = spawn_ranks(
        two_rank_monitoring, 2, str(tmp_path), timeout=180
    )
    assert wrote0 and not wrote1
    assert (tmp_path / "rank0").is_dir() and not (tmp_path / "rank1").exists()
    rows = read_csv(tmp_path / "rank0" / "Train_Samples_train_loss.csv")
    assert [int(r[0]) for r in rows[1:]] == [8, 16]  # train_batch_size = 2 x 2 x 2 ranks
    assert float(rows[-1][1]) == loss0  # the loss over both ranks' micro-batches, as the engine holds it
    assert timers0["bwd_allreduce"] > 0 and timers1["bwd_allreduce"] > 0


class _FakeExperiment:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.name, self.ended = kwargs, [], None, False

    def set_name(self, name):
        self.name = name

    def log_metric(self, name, value, step):
        self.logged.append((name, value, step))

    def end(self):
        self.ended = True


def test_comet_monitor_through_a_stand_in_comet_ml(monkeypatch):
    import importlib.machinery
    import sys
    import types

    cfg = zerostep.core.Config.from_dict(config(comet={"enabled": True, "samples_log_interval": 8}))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "comet_ml" else True)
    with pytest.raises(ConfigError, match=r"comet.enabled.*zerostep\[monitor\]"):
        MonitorMaster(cfg, rank=0)
    monkeypatch.undo()
    fake = types.ModuleType("comet_ml")
    fake.__spec__ = importlib.machinery.ModuleSpec("comet_ml", None)
    fake.start = lambda **kwargs: _FakeExperiment(**kwargs)
    monkeypatch.setitem(sys.modules, "comet_ml", fake)
    cfg = zerostep.core.Config.from_dict(
        config(comet={"enabled": True, "samples_log_interval": 8, "project": "p", "experiment_name": "run"})
    )
    master = MonitorMaster(cfg, rank=0)
    experiment = master.comet_monitor.experiment
    assert experiment.kwargs["project"] == "p" and experiment.name == "run"
    master.write_events([("Train/Samples/train_loss", 1.0, 4), ("Train/Samples/train_loss", 0.9, 8)])
    master.write_events([("Train/Samples/train_loss", 0.8, 12), ("Train/Samples/lr", 0.1, 12)])
    # a tag's first event, then one at least samples_log_interval samples later (DeepSpeed's schedule)
    assert experiment.logged == [
        ("Train/Samples/train_loss", 1.0, 4),
        ("Train/Samples/train_loss", 0.8, 12),
        ("Train/Samples/lr", 0.1, 12),
    ]
    master.close()
    assert experiment.ended and MonitorMaster(cfg, rank=1).monitors() == []
