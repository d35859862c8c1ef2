"""Ranks that disagree fail on every rank at construction, naming the first difference."""

from __future__ import annotations

import time

import torch
from models import Net, mse

from zerostep.core import Config, initialize
from zerostep.core.agreement import RanksDisagreeError, describe_difference, flatten
from zerostep.parallel.collectives import detach_shared_memory, shared_memory_channel
from zerostep.parallel.launch import spawn_ranks


def config(world_size: int, **changes) -> Config:
    d = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return Config.from_dict(d, world_size=world_size)


class NoTrainable(Net):
    def __init__(self):
        super().__init__()
        self.requires_grad_(False)


# (name, what rank 1 changes, what the message must say)
CASES = [
    (
        "model",
        {"hidden": 8},
        "parameter 'inp.weight' is shape (7, 5) torch.float32 on rank 0 but shape (8, 5)",
    ),
    ("stage", {"zero_optimization": {"stage": 2}}, "config.zero_optimization.stage is 1 on rank 0 but 2"),
    ("gas", {"gradient_accumulation_steps": 2}, "config.gradient_accumulation_steps is 1 on rank 0 but 2"),
    ("lr", {"optimizer": {"type": "AdamW", "params": {"lr": 0.5}}}, "config.optimizer.params.lr is 0.01"),
    ("optimizer", {"optimizer": {"type": "SGD", "params": {"lr": 1e-2}}}, "config.optimizer.type is 'adamw'"),
    ("precision", {"bf16": {"enabled": True}}, "config.bf16.enabled is False on rank 0 but True"),
    ("clipping", {"gradient_clipping": 0.5}, "config.gradient_clipping is 1.0 on rank 0 but 0.5"),
    ("fails", {"model": "no trainable"}, "rank 1 could not build its engine: ValueError: NoTrainable"),
]


def disagreeing_ranks(rank: int, world_size: int) -> dict:
    # an engine the ranks agree on comes first: it attaches the shared-memory channel, so the cases
    # run with the channel in place; then again over gloo's own transport
    agreed = initialize(Net(), config(world_size), loss_fn=mse, compile=False)
    with_channel = run_cases(rank, world_size, agreed)
    detach_shared_memory(agreed.group)
    return {"shared-memory": with_channel, "gloo": run_cases(rank, world_size, agreed)}


def run_cases(rank: int, world_size: int, agreed) -> dict:
    out = {"shared memory": shared_memory_channel(agreed.group) is not None}
    for name, change, _ in CASES:
        change = dict(change) if rank == 1 else {}
        model = NoTrainable() if change.pop("model", None) else Net(change.pop("hidden", 7))
        start = time.monotonic()
        try:
            initialize(model, config(world_size, **change), loss_fn=mse, compile=False)
            out[name] = ("built", "")
        except RanksDisagreeError as e:
            out[name] = ("disagree", str(e))
        except ValueError as e:
            out[name] = ("own error", str(e))
        out[name] += (time.monotonic() - start,)
    # the group still works afterwards: the engine the ranks agreed on trains a step
    state = agreed.init()
    x = torch.full((2, 5), float(rank))
    state = agreed.step(state, (x, torch.ones(2, 1)))
    out["loss"] = float(state.metrics.loss)
    return out


def test_ranks_that_disagree_fail_on_every_rank_naming_the_difference():
    both = spawn_ranks(disagreeing_ranks, 2, timeout=180, collective_timeout=30)
    for transport in ("shared-memory", "gloo"):
        check_cases([r[transport] for r in both], shared_memory=transport == "shared-memory")


def check_cases(results: list[dict], shared_memory: bool) -> None:
    assert [r["shared memory"] for r in results] == [shared_memory] * 2
    for name, _, expected in CASES:
        kinds = [r[name][0] for r in results]
        if name == "fails":  # rank 1 raises its own error, rank 0 learns of it
            assert kinds == ["disagree", "own error"], (name, results)
            assert expected in results[0][name][1]
            assert "no trainable parameters" in results[1][name][1]
        else:
            assert kinds == ["disagree", "disagree"], (name, results)
            assert results[0][name][1] == results[1][name][1]  # the same message on every rank
            assert expected in results[0][name][1], (name, results[0][name][1])
        assert max(r[name][2] for r in results) < 20  # at once, not at the collective timeout
    assert results[0]["loss"] == results[1]["loss"]


def test_first_difference_and_config_order():
    assert flatten("config", {"b": 1, "a": {"y": [1, 2], "x": None}}) == [
        ("config.a.x", "None"),
        ("config.a.y", "[1, 2]"),
        ("config.b", "1"),
    ]
    # equal configs given in another key order agree
    assert flatten("c", {"a": 1, "b": 2}) == flatten("c", {"b": 2, "a": 1})
    same = [("k1", "1"), ("k2", "2")]
    message = describe_difference([same, same, [("k1", "1"), ("k2", "3"), ("k3", "x")]])
    assert "k2 is 2 on rank 0 but 3 on rank 2 (and 1 more differences); rank 2 differs" in message
    assert "k3" not in message
    missing = describe_difference([same, [("k1", "1")]])
    assert "k2 is 2 on rank 0 but absent on rank 1" in missing
