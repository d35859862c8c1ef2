"""Elasticity: DeepSpeed's elastic batch computation, the config it drives, and a run saved at 2 ranks
resuming at 3 with the same global batch and the same trajectory as one process."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import Net, mse

from zerostep.core import Config, ConfigError, initialize
from zerostep.elasticity import (
    ElasticityConfigError,
    ElasticityError,
    ElasticityIncompatibleWorldSize,
    compute_elastic_config,
)
from zerostep.parallel.launch import spawn_ranks

# (block, world_size, DeepSpeed 0.17.6's compute_elastic_config result), produced by running
# DeepSpeed's own deepspeed/elasticity/elasticity.py on these inputs
DEEPSPEED_ANSWERS = [
    ({"max_train_batch_size": 2000, "micro_batch_sizes": [2, 4, 6], "version": 0.1}, 0, (1680, 32, None)),
    ({"max_train_batch_size": 2000, "micro_batch_sizes": [2, 4, 6], "version": 0.1}, 8, (1680, 32, 6)),
    ({"max_train_batch_size": 2000, "micro_batch_sizes": [2, 4, 6]}, 7, (1680, 32, 6)),
    ({"max_train_batch_size": 12, "micro_batch_sizes": [1, 2], "max_gpus": 4, "version": 0.1}, 3, (12, 4, 2)),
    (
        {"max_train_batch_size": 1000, "micro_batch_sizes": [3, 5, 8], "min_gpus": 2, "max_gpus": 64}
        | {"version": 0.1, "prefer_larger_batch": False},
        4,
        (720, 20, 5),
    ),
    (
        {"max_train_batch_size": 10000, "micro_batch_sizes": [8, 12, 16, 17], "min_gpus": 32}
        | {"max_gpus": 1500, "version": 0.2, "num_gpus_per_node": 8},
        64,
        (7680, 15, 12),
    ),
    (
        {"max_train_batch_size": 10000, "micro_batch_sizes": [8, 12, 16, 17], "min_gpus": 32}
        | {"max_gpus": 1500, "version": 0.2, "num_gpus_per_node": 8},
        100,
        (9600, 1, 16),  # not in the list: version 0.2 fits a batch to this world size
    ),
]


@pytest.mark.parametrize("block,world_size,answer", DEEPSPEED_ANSWERS)
def test_same_answers_as_deepspeed(block, world_size, answer):
    result = compute_elastic_config(
        {"elasticity": {"enabled": True, **block}}, "0.19.8", world_size=world_size
    )
    batch, valid = result[0], result[1]
    assert (batch, len(valid), result[2] if len(result) > 2 else None) == answer
    if world_size == 8:  # the documented example's list
        assert valid[:8] == [1, 2, 3, 4, 5, 6, 7, 8] and valid[-1] == 840


@settings(max_examples=60, deadline=None)
@given(
    micro=st.lists(st.integers(1, 12), min_size=1, max_size=3, unique=True),
    max_batch=st.integers(12, 3000),
    max_gpus=st.integers(1, 64),
)
def test_every_valid_world_size_trains_the_same_global_batch(micro, max_batch, max_gpus):
    block = {"enabled": True, "max_train_batch_size": max_batch, "micro_batch_sizes": micro}
    block |= {"max_gpus": max_gpus, "version": 0.1}
    batch, valid = compute_elastic_config({"elasticity": block}, "0.19.8")
    assert batch <= max(max_batch, math.lcm(*micro))  # DeepSpeed keeps an lcm above the maximum
    for ws in valid:
        assert 1 <= ws <= max_gpus
        c = Config.from_dict({"elasticity": block}, world_size=ws)
        mb, gas = c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps
        assert c.train_batch_size == batch == mb * gas * ws and mb in micro


def test_config_and_bad_input():
    block = {"enabled": True, "max_train_batch_size": 12, "micro_batch_sizes": [1, 2], "max_gpus": 4}
    c = Config.from_dict({"elasticity": block}, world_size=3)
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == (12, 2, 2)
    assert Config.from_dict(c.to_dict(), world_size=3) == c
    with pytest.raises(ElasticityIncompatibleWorldSize, match="world size 5 is not valid"):
        Config.from_dict({"elasticity": {**block, "version": 0.1}}, world_size=5)
    # version 0.2 (the default) fits a batch to a world size outside the list instead
    assert Config.from_dict({"elasticity": block}, world_size=5).train_batch_size == 10
    with pytest.raises(ElasticityConfigError, match="ignore_non_elastic_batch_info"):
        Config.from_dict({"elasticity": block, "train_batch_size": 8}, world_size=2)
    with pytest.warns(UserWarning, match="overridden by elasticity: 12"):
        Config.from_dict(
            {"elasticity": {**block, "ignore_non_elastic_batch_info": True}, "train_batch_size": 8},
            world_size=2,
        )
    with pytest.raises(ElasticityConfigError, match="micro_batch_sizes is required"):
        Config.from_dict({"elasticity": {"enabled": True, "max_train_batch_size": 8}}, world_size=1)
    with pytest.raises(ConfigError, match="max_gpus"):
        Config.from_dict({"elasticity": {**block, "min_gpus": 8}}, world_size=1)
    with pytest.raises(ConfigError, match="must be <= max_train_batch_size"):
        compute_elastic_config({"elasticity": {**block, "micro_batch_sizes": [16]}}, "0.19.8", world_size=1)
    with pytest.raises(ElasticityError, match="predates"):
        compute_elastic_config({"elasticity": block}, "0.3.7")
    with pytest.raises(ElasticityConfigError, match="differs from the resource scheduler"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(
                "DEEPSPEED_ELASTICITY_CONFIG", '{"max_train_batch_size": 24, "micro_batch_sizes": [1, 2]}'
            )
            Config.from_dict({"elasticity": block}, world_size=2)
    with pytest.warns(UserWarning, match="min_time"):
        Config.from_dict({"elasticity": {**block, "min_time": 20}}, world_size=1)
    off = Config.from_dict({"elasticity": {"enabled": False}, "train_batch_size": 4}, world_size=1)
    assert off.train_batch_size == 4


# --- save at 2 ranks, resume at 3 -------------------------------------------------------------------

ELASTIC = {"enabled": True, "max_train_batch_size": 12, "micro_batch_sizes": [1, 2], "max_gpus": 4}
STEPS, SPLIT = 4, 2


def elastic_engine(world_size: int):
    d = {
        "elasticity": ELASTIC,
        "gradient_clipping": 0.1,
        "zero_optimization": {"stage": 1 if world_size > 1 else 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
    }
    return initialize(Net(), Config.from_dict(d, world_size=world_size), loss_fn=mse, compile=False)


def global_batches():
    gen = torch.Generator().manual_seed(4)
    return [(torch.randn(12, 5, generator=gen), torch.randn(12, 1, generator=gen)) for _ in range(STEPS)]


def train(engine, state, steps, rank, world_size):
    for x, y in steps:
        per = x.shape[0] // world_size
        state = engine.step(state, (x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]))
    return state


def save_at(rank, world_size, path):
    engine = elastic_engine(world_size)
    engine.save(train(engine, engine.init(), global_batches()[:SPLIT], rank, world_size), path)
    return engine.config.gradient_accumulation_steps


def resume_at(rank, world_size, path):
    engine = elastic_engine(world_size)
    state = train(engine, engine.load(path), global_batches()[SPLIT:], rank, world_size)
    return engine.config.gradient_accumulation_steps, engine.full_params(state)


def test_saved_at_two_ranks_resumes_at_three_with_the_same_global_batch(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = elastic_engine(1)
        want = one.full_params(train(one, one.init(), global_batches(), 0, 1))
    assert spawn_ranks(save_at, 2, str(tmp_path), timeout=120) == [3, 3]  # micro 2 x GAS 3 x 2 ranks
    resumed = spawn_ranks(resume_at, 3, str(tmp_path), timeout=120)
    for gas, params in resumed:
        assert gas == 2  # micro 2 x GAS 2 x 3 ranks: the same 12
        for name, p in want.items():
            assert float((params[name] - p).abs().max() / p.abs().max()) <= 1e-5, name
