"""The comms logger: byte totals of the engine's collective primitives and zerostep.comm's calls on 2 gloo
ranks, over gloo's transport and the shared-memory channel; DeepSpeed's bandwidth formulas and summary."""

import pytest
import torch
import torch.distributed as dist

from zerostep import comm
from zerostep.core.monitoring.comms_logger import COMMS_LOGGER, bandwidths
from zerostep.parallel import collectives
from zerostep.parallel.launch import spawn_ranks


@pytest.fixture(autouse=True)
def logger_off():
    yield
    comm.configure(enabled=False, prof_all=True, prof_ops=[], verbose=False, debug=False)
    comm.reset_log()


def _issue(rank, world, shard_numel):
    """One of each engine primitive (async ones too) and two zerostep.comm calls."""
    flat = torch.ones(world * shard_numel)
    collectives.all_reduce_into(flat, None)
    collectives.reduce_scatter_into(torch.empty(shard_numel), flat.clone(), None, async_op=True).wait()
    full = torch.zeros(world * shard_numel, dtype=torch.float64)
    full.view(world, -1)[rank] = rank + 1
    collectives.all_gather_rows(full, None, bucket_numel=None)
    assert torch.equal(full.view(world, -1)[:, 0], torch.arange(1.0, world + 1, dtype=torch.float64))
    comm.all_reduce(torch.ones(3, dtype=torch.float16))
    comm.barrier()


def _two_ranks(rank, world):
    comm.configure(deepspeed_config={"comms_logger": {"enabled": True}})
    assert collectives.comms_log is COMMS_LOGGER
    seen = {}
    for channel in ("gloo", "shm"):
        if channel == "shm":
            assert collectives.attach_shared_memory(None)
        comm.reset_log()
        _issue(rank, world, shard_numel=6)
        seen[channel] = {name: COMMS_LOGGER.total_bytes(name) for name in comm.get_logged_comm_ops()}
        seen[channel + "_count"] = comm.get_comm_operation_count()
    summary = comm.log_summary(return_dict=True)["summary"]
    collectives.detach_shared_memory(None)
    comm.configure(enabled=True, prof_all=False, prof_ops=["all_gather"])
    comm.reset_log()
    _issue(rank, world, shard_numel=6)
    seen["filtered"] = comm.get_logged_comm_ops()
    comm.configure(enabled=False)
    assert collectives.comms_log is None  # off: the primitives' one check finds nothing
    comm.reset_log()
    _issue(rank, world, shard_numel=6)
    seen["off"] = comm.get_comm_operation_count()
    return seen, {k: sorted(v) for k, v in summary.items()}


def test_byte_totals_equal_the_tensor_sizes_with_and_without_shared_memory():
    results = spawn_ranks(_two_ranks, 2, timeout=120)
    expected = {
        "all_reduce": 2 * 6 * 4 + 3 * 2,  # the engine's fp32 [12] and zerostep.comm's fp16 [3]
        "reduce_scatter": 6 * 4,  # this rank's fp32 shard
        "all_gather": 6 * 8,  # this rank's fp64 row
        "barrier": 0,
    }
    for seen, summary in results:
        assert seen["gloo"] == expected and seen["shm"] == expected
        assert seen["gloo_count"] == seen["shm_count"] == 5
        assert summary["all_reduce"] == [6, 48]  # one row per message size
        assert seen["filtered"] == ["all_gather"] and seen["off"] == 0


def test_bandwidth_formulas_follow_deepspeed():
    size, t, n = 10**9, 1.0, 4
    assert bandwidths("all_reduce", size, t, n) == (16.0, 8 * 2 * 3 / 4)
    assert bandwidths("all_gather", size, t, n) == (32.0, 32.0 * 3 / 4)
    assert bandwidths("reduce_scatter", size, t, n) == (32.0, 24.0)
    assert bandwidths("all_to_all_single", size, t, n) == (8.0, 6.0)
    assert bandwidths("broadcast", size, t, n) == (8.0, 8.0)


def test_summary_on_one_process(capsys):
    dist_was = dist.is_initialized()
    assert not dist_was
    comm.configure(enabled=True, verbose=True)
    COMMS_LOGGER.append("all_reduce", "all_reduce", 2.0, 1 << 20, 2)
    COMMS_LOGGER.append("all_reduce", "all_reduce", 4.0, 1 << 20, 2)
    out = comm.log_summary(return_dict=True)
    row = out["summary"]["all_reduce"][1 << 20]
    assert row["count"] == 2 and row["total_latency_ms"] == 6.0 and row["msg_size_str"] == "1.0 MB"
    printed = capsys.readouterr().out
    assert "comm op: all_reduce | time (ms): 2.00 | msg size: 1.0 MB" in printed
    assert "Comm. Op" in printed and "busbw_avg (Gbps)" in printed
    with pytest.raises(Exception, match="prof_ops"):
        zerostep_config = {"train_micro_batch_size_per_gpu": 1, "comms_logger": {"prof_ops": "all_reduce"}}
        from zerostep.core.config import Config

        Config.from_dict(zerostep_config)


def _engine_steps(rank, world, stage):
    import warnings

    import torch.nn.functional as F
    from models import Net

    import zerostep

    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": stage},
        "comms_logger": {"enabled": True},
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, _, _, _ = zerostep.initialize(model=Net(), config=cfg, compile=True)
    forced_eager = any("runs eagerly" in str(w.message) for w in caught) and not engine._core.compile
    comm.reset_log()
    engine._core.comm.reset()
    g = torch.Generator().manual_seed(rank)
    for _ in range(2 * 2):
        x, y = torch.randn(2, 5, generator=g), torch.randn(2, 1, generator=g)
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    measured = {name: COMMS_LOGGER.total_bytes(name) for name in comm.get_logged_comm_ops()}
    planned = dict(engine._core.comm.bytes_by_kind)
    comm.configure(enabled=False)
    return forced_eager, measured, planned


@pytest.mark.parametrize("stage", [1, 2])
def test_engine_steps_measured_against_the_plan(stage):
    for forced_eager, measured, planned in spawn_ranks(_engine_steps, 2, stage, timeout=180):
        assert forced_eager
        # what was sent equals the plan: the plan counts an all-reduce as 2x its buffer and a
        # reduce-scatter / all-gather as the full buffer, the logger the message (the buffer; one of the
        # 2 ranks' shards)
        assert set(measured) == set(planned) and all(v > 0 for v in measured.values())
        assert {kind: 2 * n for kind, n in measured.items()} == planned
