"""Progressive layer drop and the legacy curriculum: schedules against hand-computed values, the model
receiving DeepSpeed's keyword arguments (functional step and facade), batches cut as scheduled."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zerostep
from zerostep.core import Config, ConfigError, initialize
from zerostep.core.config.schedules import curriculum_difficulty
from zerostep.core.training_schedules import pld_theta


class Recorder(nn.Module):
    """Token model that records what DeepSpeed's engine hands its forward; theta scales a residual."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16)
        self.seen: list[dict] = []

    def forward(self, ids, progressive_layer_drop=False, pld_theta=None, curriculum_seqlen=None):
        self.seen.append({"pld": progressive_layer_drop, "theta": pld_theta, "seqlen": curriculum_seqlen})
        self.seen[-1]["width"] = ids.shape[1]
        h = self.embed(ids)
        keep = pld_theta if progressive_layer_drop else 1.0
        return self.head(h + keep * torch.tanh(self.block(h)))


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1))


def cfg(**extra) -> dict:
    d = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
    }
    d.update(extra)
    return d


def tokens(n=1, width=17):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 16, (2, width), generator=gen) for _ in range(n)]


def test_pld_schedule_and_kwargs_in_the_functional_step():
    theta, gamma = 0.5, 0.1
    assert pld_theta(theta, gamma, 0) == 1.0 and pld_theta(theta, gamma, 1) == 1.0  # DeepSpeed's timing
    assert pld_theta(theta, gamma, 3) == pytest.approx(0.5 * math.exp(-0.2) + 0.5)
    model = Recorder()
    pld = {"enabled": True, "theta": theta, "gamma": gamma}
    engine = initialize(model, cfg(progressive_layer_drop=pld), loss_fn=lm_loss, compile=False)
    state = engine.init(seed=0)
    for ids in tokens(4):
        state = engine.step(state, ids)
    assert [s["theta"] for s in model.seen] == [pld_theta(theta, gamma, t) for t in range(4)]
    assert all(s["pld"] for s in model.seen)
    model.seen.clear()
    model.eval()  # DeepSpeed passes them in training mode only
    engine.step(state, tokens(1)[0])
    assert model.seen[0]["pld"] is False
    with pytest.warns(UserWarning, match="run eagerly"):
        compiled = initialize(Recorder(), cfg(progressive_layer_drop=pld), loss_fn=lm_loss, compile=True)
    assert not compiled.compile_forward


def test_pld_in_the_facade():
    model = Recorder()
    pld = {"enabled": True, "theta": 0.5, "gamma": 0.1}
    engine, *_ = zerostep.initialize(model=model, config=cfg(progressive_layer_drop=pld), compile=False)
    thetas = []
    for ids in tokens(3):
        thetas.append(engine.get_pld_theta())
        logits = engine(ids[:, :-1])
        engine.backward(F.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1)))
        engine.step()
    assert [s["theta"] for s in model.seen] == thetas == [pld_theta(0.5, 0.1, t) for t in range(3)]
    plain, *_ = zerostep.initialize(model=Recorder(), config=cfg(), compile=False)
    assert plain.get_pld_theta() is None


def curriculum(schedule_type, schedule_config, low=4, high=16):
    block = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": low, "max_difficulty": high}
    block |= {"schedule_type": schedule_type, "schedule_config": schedule_config}
    return Config.from_dict(cfg(curriculum_learning=block), world_size=1)


def test_curriculum_schedules_against_hand_computed_values():
    linear = curriculum(
        "fixed_linear", {"total_curriculum_step": 10, "difficulty_step": 4}
    ).curriculum_learning
    # difficulty(t + 1) = floor((t + 1) / 10 * 12 + 4), rounded down to a multiple of 4, capped at 16
    assert [curriculum_difficulty(linear, t) for t in range(0, 12, 2)] == [4, 4, 8, 12, 12, 16]
    root = curriculum("fixed_root", {"total_curriculum_step": 16, "difficulty_step": 2, "root_degree": 2})
    assert [curriculum_difficulty(root.curriculum_learning, t) for t in (0, 3, 8, 20)] == [6, 10, 12, 16]
    discrete = curriculum(
        "fixed_discrete", {"difficulty": [4, 16, 8], "max_step": [2, 4]}
    ).curriculum_learning
    # steps 1-2: 4, 3-4: 16 (the maximum), then frozen there although the list says 8 (DeepSpeed's rule)
    assert [curriculum_difficulty(discrete, t) for t in range(6)] == [4, 4, 16, 16, 16, 16]


def test_curriculum_cuts_batches_and_passes_seqlen():
    model = Recorder()
    c = curriculum("fixed_linear", {"total_curriculum_step": 4, "difficulty_step": 4}, low=4, high=17)
    engine = initialize(model, c, loss_fn=lm_loss, compile=False)
    state = engine.init(seed=0)
    for ids in tokens(5):
        state = engine.step(state, ids)
    want = [curriculum_difficulty(c.curriculum_learning, t) for t in range(5)]
    assert want == [4, 8, 12, 16, 17]
    assert [s["seqlen"] for s in model.seen] == want
    assert [s["width"] for s in model.seen] == [w - 1 for w in want]  # lm_loss drops the last token


def test_bad_input():
    with pytest.raises(ConfigError, match="progressive_layer_drop.theta"):
        Config.from_dict(cfg(progressive_layer_drop={"enabled": True, "theta": 1.5}))
    with pytest.raises(ConfigError, match="progressive_layer_drop.gamma"):
        Config.from_dict(cfg(progressive_layer_drop={"enabled": True, "gamma": -1}))
    with pytest.raises(ConfigError, match="max_difficulty"):
        curriculum("fixed_linear", {"total_curriculum_step": 4, "difficulty_step": 4}, low=8, high=4)
    with pytest.raises(ConfigError, match="one more entry than max_step"):
        curriculum("fixed_discrete", {"difficulty": [4, 8], "max_step": [2, 4]})
    with pytest.raises(ConfigError, match="root_degree = null: is required"):
        curriculum("fixed_root", {"total_curriculum_step": 4, "difficulty_step": 4})
    with pytest.warns(UserWarning, match="curriculum_type = 'vocab' has no effect"):
        block = {"enabled": True, "curriculum_type": "vocab", "min_difficulty": 4, "max_difficulty": 8}
        block |= {"schedule_type": "fixed_linear"}
        Config.from_dict(
            cfg(
                curriculum_learning=block
                | {"schedule_config": {"total_curriculum_step": 4, "difficulty_step": 4}}
            )
        )
    with pytest.raises(ConfigError, match="custom schedule"):
        curriculum("custom", {})
    zero = curriculum("fixed_linear", {"total_curriculum_step": 100, "difficulty_step": 8}, low=2, high=16)
    engine = initialize(Recorder(), zero, loss_fn=lm_loss, compile=False)
    with pytest.raises(ValueError, match="sequence length 0"):
        engine.step(engine.init(seed=0), tokens(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an off block is accepted silently, as DeepSpeed accepts it
        Config.from_dict(cfg(curriculum_learning={"enabled": False, "min_difficulty": 8}))


@pytest.mark.parametrize(
    "schedule",
    [
        {
            "schedule_type": "fixed_linear",
            "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 4},
        },
        {
            "schedule_type": "fixed_root",
            "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 4, "root_degree": 2},
        },
        {"schedule_type": "fixed_discrete", "schedule_config": {"difficulty": [4, 8], "max_step": [3]}},
    ],
)
def test_curriculum_config_round_trips_through_to_dict(schedule):
    block = {
        "enabled": True,
        "curriculum_type": "seqlen",
        "min_difficulty": 4,
        "max_difficulty": 16,
        **schedule,
    }
    cfg = Config.from_dict({"train_micro_batch_size_per_gpu": 2, "curriculum_learning": block})
    assert cfg.to_dict()["curriculum_learning"] == block
    assert Config.from_dict(cfg.to_dict()) == cfg
