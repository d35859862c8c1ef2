"""``torch_autocast``: the forward under torch.autocast (fp32 weights), against a plain PyTorch loop
doing the same; fp16 autocast's loss scaling; the facade's rule for an outer autocast; bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zerostep
from zerostep.core import Config, ConfigError, initialize
from zerostep.core.autocast import GRAD_SCALER_EQUIVALENT, autocast_plan_of, loss_scaling_of, under_autocast


class Block(nn.Module):
    """Linear (autocast: bf16) then LayerNorm and softmax (autocast: fp32), so results depend on it."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.softmax(self.norm(self.fc(x)), dim=-1) * 4)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Block()


def xent(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def data(n: int = 4, rows: int = 8):
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(rows, 8, generator=gen) * 3, torch.randint(0, 3, (rows,), generator=gen))
        for _ in range(n)
    ]


def config_dict(stage: int = 0, autocast: dict | None = None, **extra) -> dict:
    d = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
    }
    if autocast is not None:
        d["torch_autocast"] = autocast
    d.update(extra)
    return d


def torch_loop(model: nn.Module, batches, dtype: torch.dtype | None) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for batch in batches:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = xent(model, batch)
        loss.backward()
        opt.step()
    return model


def trained(engine, batches) -> dict[str, torch.Tensor]:
    state = engine.init(seed=0)
    for batch in batches:
        state = engine.step(state, batch)
    return {n: t.detach().clone() for n, t in engine.full_params(state).items()}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[n].detach().float() - b[n].detach().float()).abs().max()) for n in a)


@pytest.mark.parametrize("stage", [0, 3])
def test_autocast_bf16_equals_torch_loop(stage):
    reference = dict(torch_loop(make_model(), data(), torch.bfloat16).named_parameters())
    plain = dict(torch_loop(make_model(), data(), None).named_parameters())
    cfg = config_dict(stage, {"enabled": True, "dtype": "torch.bfloat16"})
    with pytest.warns(UserWarning, match="all-reduced in float32"):
        engine = initialize(make_model(), cfg, loss_fn=xent, compile=False)
    got = trained(engine, data())
    assert max_diff(got, reference) < 1e-6
    assert max_diff(reference, plain) > 1e-4  # autocast changed the numbers: the check has teeth
    assert all(t.dtype == torch.float32 for t in got.values())  # the weights stay fp32


def test_autocast_survives_torch_compile():
    # The engine compiles the forward with the autocast entered inside it (under_autocast); dynamo must
    # keep it in the graph. (The whole compiled engine under autocast matches eager to bf16 rounding,
    # 5e-4 here after 2 steps: inductor fuses elementwise ops without rounding between them.)
    model = make_model()
    plan = autocast_plan_of(
        Config.from_dict(config_dict(0, {"enabled": True, "dtype": "bf16"}), world_size=1),
        torch.device("cpu"),
    )
    forward = torch.compile(under_autocast(lambda x: model.fc(x), plan), backend="aot_eager", fullgraph=True)
    x = data(1)[0][0]
    assert forward(x).dtype == torch.bfloat16
    assert torch.equal(forward(x), under_autocast(model.fc, plan)(x))


def test_fp16_autocast_scales_like_grad_scaler():
    cfg = Config.from_dict(config_dict(0, {"enabled": True, "dtype": "fp16"}), world_size=1)
    assert loss_scaling_of(cfg) == GRAD_SCALER_EQUIVALENT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = initialize(make_model(), cfg, loss_fn=xent, compile=False)
    state = engine.init(seed=0)
    assert float(state.scaler.scale) == 2.0**16
    x, y = data(1)[0]
    state = engine.step(state, (x * 1e6, y))  # fp16 activations overflow
    assert bool(state.metrics.skipped) and float(state.scaler.scale) == 2.0**15  # no hysteresis
    state = engine.step(state, (x, y))
    assert not bool(state.metrics.skipped)
    # the fp16 block's own settings win when it is on
    both = Config.from_dict(
        config_dict(0, {"enabled": True, "dtype": "fp16"}, fp16={"enabled": True, "initial_scale_power": 8}),
        world_size=1,
    )
    assert loss_scaling_of(both).initial_scale_power == 8


def test_bf16_block_with_autocast_runs_losses_in_fp32():
    seen = []

    def recording_xent(model, batch):
        loss = xent(model, batch)
        seen.append(loss.dtype)
        return loss

    for block, expected in (({"enabled": True}, torch.float32), (None, torch.bfloat16)):
        cfg = config_dict(1, block, bf16={"enabled": True})  # dtype unset: CPU's default, bf16
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # bf16 weights: reduced in bf16 as in DeepSpeed, no warning
            engine = initialize(make_model(), cfg, loss_fn=recording_xent, compile=False)
        assert block is None or engine.autocast.dtype == torch.bfloat16
        seen.clear()
        engine.step(engine.init(seed=0), data(1)[0])
        # cross_entropy is on CPU autocast's fp32 list: fp32 although the weights are bf16
        assert seen == [expected]


def test_facade_forward_and_outer_autocast():
    cfg = config_dict(0, {"enabled": True, "dtype": "bf16"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, *_ = zerostep.initialize(model=make_model(), config=cfg, compile=False)
    x, y = data(1)[0]
    assert engine(x).dtype == torch.bfloat16
    loss = F.cross_entropy(engine(x).float(), y)
    engine.backward(loss)
    engine.step()
    plain, *_ = zerostep.initialize(model=make_model(), config=config_dict(0), compile=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="switched off inside the engine"):
            out = plain(x)
    assert out.dtype == torch.float32  # DeepSpeed's rule: no torch_autocast block, no autocast inside


def test_config_parsing_and_bad_input():
    recipe_dict = config_dict(
        3,
        {"enabled": True, "dtype": "torch.bfloat16"},
        bf16={"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True},
    )
    cfg = Config.from_dict(recipe_dict, world_size=2)  # DeepSpeedExamples' bf16_master_weight recipe
    assert cfg.torch_autocast.enabled and cfg.torch_autocast.dtype == "bf16"
    assert Config.from_dict(cfg.to_dict(), world_size=2) == cfg
    recipe = initialize(
        make_model(), Config.from_dict(recipe_dict, world_size=1), loss_fn=xent, compile=False
    )
    state = recipe.step(recipe.init(seed=0), data(1)[0])
    assert all(m.dtype == torch.bfloat16 for m in state.master.values()) and bool(
        torch.isfinite(state.metrics.loss)
    )
    assert autocast_plan_of(Config.from_dict(config_dict(), world_size=1), torch.device("cpu")) is None
    with pytest.raises(ConfigError, match="torch_autocast.dtype"):
        Config.from_dict(config_dict(0, {"enabled": True, "dtype": "fp32"}), world_size=1)
    with pytest.raises(ConfigError, match="lower_precision_safe_modules"):
        Config.from_dict(
            config_dict(0, {"enabled": True, "lower_precision_safe_modules": "Linear"}), world_size=1
        )
    with pytest.raises(ConfigError, match="did you mean"):
        Config.from_dict(config_dict(0, {"enabled": True, "dtyp": "bf16"}), world_size=1)
    bad = config_dict(0, {"enabled": True, "lower_precision_safe_modules": ["torch.nn.NoSuchLayer"]})
    with pytest.raises(ValueError, match="cannot import 'torch.nn.NoSuchLayer'"):
        initialize(make_model(), bad, loss_fn=xent, compile=False)
    only_norm = config_dict(0, {"enabled": True, "lower_precision_safe_modules": ["torch.nn.LayerNorm"]})
    with pytest.warns(UserWarning, match="lower_precision_safe_modules"):
        initialize(make_model(), only_norm, loss_fn=xent, compile=False)
