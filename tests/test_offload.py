"""offload_optimizer (core/offload.py, parallel/host_transfer.py): training with the master and
optimizer state in host memory equals training without, exactly in fp32; checkpoints move between
offloaded and plain engines; the chunked mover's order and copies; the keys that have no effect."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import Net, mse

import zerostep
from zerostep.core import Config, initialize
from zerostep.core.param_groups import ParamGroup
from zerostep.errors import ConfigError
from zerostep.parallel.host_transfer import Chunk, HostTransfer, plan_chunks, run_pipeline
from zerostep.parallel.launch import spawn_ranks

ADAMW = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}}


def config(stage: int, offload: bool, world_size: int = 1, params: bool = False, **extra) -> Config:
    """``offload``: offload_optimizer; ``params``: offload_param too (stage 3)."""
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", **extra.pop("offload", {})}
        zero["sub_group_size"] = extra.pop("sub_group_size", 16)  # several chunks per unit
    if params:
        zero["offload_param"] = {"device": "cpu"}
    d = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,  # the host update's clip coefficient is exercised too
        "zero_optimization": zero,
        "optimizer": extra.pop("optimizer", ADAMW),
        **extra,
    }
    return Config.from_dict(d, world_size=world_size)


def build(cfg: Config, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "saves no memory on a CPU engine"
        return initialize(Net(), cfg, loss_fn=mse, compile=False, **kwargs)


def batches(rank: int = 0, world_size: int = 1, steps: int = 3):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        x, y = torch.randn(4 * world_size, 5, generator=g), torch.randn(4 * world_size, 1, generator=g)
        out.append((x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]))
    return out


def train(engine, state=None, rank: int = 0, world_size: int = 1):
    state = engine.init() if state is None else state
    for batch in batches(rank, world_size):
        state = engine.step(state, batch)
    return state


def assert_equal_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- the mover, in process ---------------------------------------------------------------------------


def test_chunks_tile_every_group_on_aligned_boundaries():
    chunks = plan_chunks({"": 100, "blocks.0": 32, "blocks.1": 7}, 20)  # 20 -> 32 (16-element multiples)
    assert chunks == [
        Chunk("", 0, 32), Chunk("", 32, 64), Chunk("", 64, 96), Chunk("", 96, 100),
        Chunk("blocks.0", 0, 32), Chunk("blocks.1", 0, 7),
    ]  # fmt: skip
    assert plan_chunks({"a": 50}, None) == [Chunk("a", 0, 50)]
    with pytest.raises(ValueError, match="chunk_numel"):
        plan_chunks({"a": 1}, 0)


def test_pipeline_fetches_first_then_updates_and_stores_chunk_by_chunk():
    events = []
    chunks = plan_chunks({"a": 48, "b": 16}, 16)
    run_pipeline(
        chunks,
        fetch=lambda c: events.append(("fetch", c)) or c,
        update=lambda c: events.append(("update", c)),
        store=lambda c: events.append(("store", c)),
        wait=lambda handle: events.append(("wait", handle)),
    )
    n = len(chunks)
    assert events[:n] == [("fetch", c) for c in chunks]  # every copy to the host queued up front
    # then per chunk: its copy awaited, updated, its copy back queued before the next update
    assert events[n:] == [e for c in chunks for e in (("wait", c), ("update", c), ("store", c))]


def test_transfer_copies_between_distinct_host_buffers_and_counts_bytes():
    mover = HostTransfer(torch.device("cpu"), pin_memory=True)
    assert not mover.pin_memory  # pinning is CUDA-only
    device = torch.arange(64, dtype=torch.bfloat16)
    host = mover.host_empty(64, torch.bfloat16)
    copy = mover.host_copy(device)
    assert copy.data_ptr() != device.data_ptr() and torch.equal(copy, device)
    for c in plan_chunks({"g": 64}, 16):
        mover.wait(mover.to_host(host[c.lo : c.hi], device[c.lo : c.hi]))
    assert torch.equal(host, device) and host.data_ptr() != device.data_ptr()
    back = torch.zeros(64, dtype=torch.bfloat16)
    mover.to_device(back, host * 2)
    mover.finish()
    assert torch.equal(back, device * 2)
    assert mover.bytes_to_host == 128 and mover.bytes_to_device == 128


# --- one process ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, params", [(0, False), (1, False), (2, False), (3, False), (3, True)])
def test_offloaded_training_equals_plain_in_fp32(stage, params):
    plain, offloaded = build(config(stage, False)), build(config(stage, True, params=params))
    assert (offloaded._runner is not None and offloaded._runner.offload_to is not None) == params
    a, b = train(plain), train(offloaded)
    assert_equal_params(plain.full_params(a), offloaded.full_params(b))
    # the state lives apart: master and moments in host buffers of their own, not the parameters
    param_ptrs = {p.untyped_storage().data_ptr() for p in b.params.flats.values()}
    assert not param_ptrs & {m.untyped_storage().data_ptr() for m in b.master.values()}
    assert len(offloaded._offload.update.chunks) > len(offloaded.plan.layouts)
    moved = offloaded._offload.moved_bytes()
    numel = sum(lay.padded_numel for lay in offloaded.plan.layouts.values())
    assert moved == {"to_host": 3 * numel * 4, "to_device": 3 * numel * 4}  # fp32 grads and params, 3 steps
    report, before = offloaded.memory_report(b), plain.memory_report(a)
    on_host = report["master"] + report["optimizer_state"] + (report["params"] if params else 0)
    assert report["host"] == on_host + report["offload_staging"]
    assert report["device"] == report["gradients"] + (0 if params else report["params"])
    assert report["offload_staging"] == 2 * numel * 4  # a host gradient and a host parameter buffer
    assert before["host"] == 0 and before["device"] == before["total"]


@pytest.mark.parametrize(
    "optimizer",
    [
        {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
        {"type": "Adagrad", "params": {"lr": 0.1}},
        {"type": "Lion", "params": {"lr": 1e-3}},
    ],
)
def test_other_elementwise_optimizers_offload_exactly(optimizer):
    plain, offloaded = (
        build(config(1, False, optimizer=optimizer)),
        build(config(1, True, optimizer=optimizer)),
    )
    assert_equal_params(plain.full_params(train(plain)), offloaded.full_params(train(offloaded)))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_offloaded_training_matches_plain(dtype):
    # fp16's first steps overflow at the initial scale 2**16 and are skipped: nothing is copied then
    low = {dtype: {"enabled": True}}
    plain, offloaded = build(config(2, False, **low)), build(config(2, True, **low))
    a, b = train(plain), train(offloaded)
    assert int(a.skipped_steps) == int(b.skipped_steps)
    applied = 3 - int(b.skipped_steps)
    numel = sum(lay.padded_numel for lay in offloaded.plan.layouts.values())
    assert offloaded._offload.moved_bytes()["to_device"] == applied * numel * 2
    assert all(p.dtype == plain.compute_dtype for p in b.params.flats.values())
    assert all(m.dtype == torch.float32 for m in b.master.values())
    pa, pb = plain.full_params(a), offloaded.full_params(b)
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=1e-3, atol=1e-3)
    report = offloaded.memory_report(b)
    assert report["offload_staging"] == 2 * 2 * sum(
        lay.padded_numel for lay in offloaded.plan.layouts.values()
    )


def test_param_groups_update_once_over_host_buffers():
    def groups(model):
        names = [n for n, _ in model.named_parameters()]
        weights = tuple(n for n in names if "bias" not in n)
        biases = tuple(n for n in names if "bias" in n)
        return [ParamGroup(weights, {"lr": 1e-2}), ParamGroup(biases, {"lr": 1e-3, "weight_decay": 0.0})]

    def run(offload: bool):
        model = Net()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = initialize(
                model, config(1, offload), loss_fn=mse, compile=False, param_groups=groups(model)
            )
        return engine, train(engine)

    (a, sa), (b, sb) = run(False), run(True)
    assert not b._offload.update.chunked
    assert_equal_params(a.full_params(sa), b.full_params(sb))


def test_checkpoints_move_between_offloaded_and_plain_engines(tmp_path):
    offloaded = build(config(3, True))
    state = train(offloaded)
    offloaded.save(state, tmp_path, tag="off")
    plain = build(config(3, False))
    loaded = plain.load(tmp_path, tag="off")
    assert_equal_params(plain.full_params(loaded), offloaded.full_params(state))
    plain.save(loaded, tmp_path, tag="plain")
    # back into an offloaded engine: in new memory, and into a state of its own
    again = build(config(3, True, params=True))  # offload_param: the shards in host buffers too
    fresh = again.load(tmp_path, tag="plain")
    param_ptrs = {p.untyped_storage().data_ptr() for p in fresh.params.flats.values()}
    assert not param_ptrs & {m.untyped_storage().data_ptr() for m in fresh.master.values()}
    target = again.init()
    master_ptrs = [m.data_ptr() for m in target.master.values()]
    into = again.load(tmp_path, tag="plain", into=target)
    assert [m.data_ptr() for m in into.master.values()] == master_ptrs  # loaded in place
    # both resume as the run that never stopped
    ref = build(config(3, False))
    ref_state = ref.init()
    for batch in batches() * 2:
        ref_state = ref.step(ref_state, batch)
    for s in (fresh, into):
        assert_equal_params(again.full_params(train(again, s)), ref.full_params(ref_state))


def test_facade_with_offload_and_a_gathered_write_equals_plain():
    def run(offload: bool):
        zero = {"stage": 3, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
        d = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": zero, "optimizer": ADAMW}
        model = Net()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine, *_ = zerostep.initialize(model=model, config=d, compile=False)
        for i, (x, y) in enumerate(batches()):
            if i == 2:  # a write through GatheredParameters reaches the host master and the device shard
                with zerostep.zero.GatheredParameters([model.head.bias], modifier_rank=0):
                    model.head.bias.data.fill_(3.0)
                assert engine._core.full_params(engine.state)["head.bias"].item() == 3.0
            engine.backward(torch.nn.functional.mse_loss(engine(x), y))
            engine.step()
        return engine._core.full_params(engine.state)

    assert_equal_params(run(False), run(True))


def test_keys_without_effect_warn_and_unsupported_ones_raise():
    offload = {"device": "cpu", "ratio": 0.5, "buffer_count": 8, "pin_memory": True}
    d = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3, "offload_optimizer": offload, "offload_param": {"device": "cpu"}},
        "optimizer": ADAMW,
    }
    with pytest.warns(UserWarning) as record:
        initialize(Net(), Config.from_dict(d, world_size=1), loss_fn=mse, compile=False)
    text = " | ".join(str(w.message) for w in record)
    for needle in (
        "offload_optimizer.ratio has no effect",
        "buffer_count has no effect",
        "saves no memory",
        "pin_memory has no effect here",
    ):
        assert needle in text, needle
    assert "pipeline_read" not in text and "offload_param" not in text  # defaults; implemented
    del d["zero_optimization"]["offload_optimizer"]
    with pytest.warns(UserWarning, match="offload_param has no effect without offload_optimizer"):
        engine = initialize(Net(), Config.from_dict(d, world_size=1), loss_fn=mse, compile=False)
    assert engine._offload is None and engine._runner.offload_to is None
    with pytest.raises(ConfigError, match="'lamb' optimizer cannot run offloaded"):
        build(config(1, True, optimizer={"type": "Lamb", "params": {"lr": 1e-3}}))
    with pytest.raises(ConfigError, match="NVMe"):
        Config.from_dict({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})


# --- two ranks -----------------------------------------------------------------------------------------


def offload_stages(rank: int, world_size: int) -> dict:
    out = {}
    for stage, params in ((1, False), (2, False), (3, False), (3, True)):  # stage 0: as on one rank
        plain = build(config(stage, False, world_size))
        offloaded = build(config(stage, True, world_size, params=params))
        a = train(plain, rank=rank, world_size=world_size)
        b = train(offloaded, rank=rank, world_size=world_size)
        pa, pb = plain.full_params(a), offloaded.full_params(b)
        assert all(torch.equal(pa[n], pb[n]) for n in pa), stage
        report = offloaded.memory_report(b)
        on_host = report["master"] + report["optimizer_state"] + (report["params"] if params else 0)
        assert report["host"] == on_host + report["offload_staging"]
        out[stage, params] = (pb, report["master"])
    return out


def test_offload_on_two_ranks_equals_plain_at_every_stage():
    per_rank = spawn_ranks(offload_stages, 2, timeout=180)
    for (stage, offload_params), (params, master_bytes) in per_rank[0].items():
        assert_equal_params(params, per_rank[1][stage, offload_params][0])  # ranks agree
        full = sum(p.numel() for p in params.values()) * 4
        assert (master_bytes < full) == (stage >= 1)  # the host master is this rank's shard at stages 1-3
