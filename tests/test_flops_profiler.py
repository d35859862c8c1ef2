"""The FLOPs profiler (zerostep.profiling.flops_profiler): counts against an analytic MLP, a transformer layer
against FlopCounterMode's own total, per-module sums, DeepSpeed's printout and the config-driven facade."""

import pytest
import torch
import torch.nn.functional as F
from models import Net
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import zerostep
from zerostep.errors import ConfigError
from zerostep.profiling.flops_profiler import FlopsProfiler, get_model_profile


def mlp(sizes):
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


def test_mlp_matches_the_analytic_count():
    sizes, batch = (32, 64, 48, 8), 5
    model = mlp(sizes)
    flops, macs, params = get_model_profile(
        model, input_shape=(batch, sizes[0]), print_profile=False, as_string=False
    )
    analytic = sum(2 * a * b * batch for a, b in zip(sizes, sizes[1:]))  # forward: 2*in*out per sample
    assert abs(flops - analytic) <= 0.01 * analytic
    assert macs == flops // 2
    assert params == sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    assert model.training  # eval only while profiling


def test_transformer_layer_total_and_per_module_sums(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    x = torch.randn(3, 7, 32)
    with FlopCounterMode(display=False) as reference:
        layer(x)
    prof = FlopsProfiler(layer)
    prof.start_profile()
    out = layer(x)
    with prof.section("backward"):
        out.sum().backward()
    assert prof.get_total_flops() == reference.get_total_flops() > 0  # forward only: the backward is apart
    assert prof.sections["backward"].flops > prof.get_total_flops()  # ~2x the forward, counted
    profiles = {p.name: p for p in prof.module_profiles()}
    root = profiles["TransformerEncoderLayer"]
    children = [p for p in profiles.values() if p.depth == 1]
    # linear1/linear2 run as modules; attention's projections run inside MultiheadAttention's functional
    # forward, so they count toward self_attn (its out_proj module is never called)
    assert profiles["TransformerEncoderLayer.linear1"].flops == 2 * 3 * 7 * 32 * 64
    assert profiles["TransformerEncoderLayer.self_attn.out_proj"].flops == 0
    assert sum(p.flops for p in children) == root.flops
    assert root.params == sum(p.numel() for p in layer.parameters())
    assert root.duration >= max(p.duration for p in children) > 0
    out_file = tmp_path / "profile" / "flops.txt"
    prof.print_model_profile(profile_step=3, module_depth=1, top_modules=2, output_file=str(out_file))
    prof.end_profile()
    text = out_file.read_text()
    assert "DeepSpeed Flops Profiler" in text and "Profile Summary at step 3:" in text
    assert "depth 1:" in text and "depth 2:" not in text  # module_depth
    assert "(linear1): Linear(" in text and "bwd flops per GPU (counted):" in text
    assert prof.get_total_flops() == 0 and not prof.started  # end_profile forgets


def test_profiler_counts_nothing_outside_the_window():
    model = mlp((4, 4))
    prof = FlopsProfiler(model)
    model(torch.randn(2, 4))
    prof.start_profile()
    model(torch.randn(2, 4))
    model(torch.randn(2, 4))
    prof.stop_profile()
    model(torch.randn(2, 4))
    assert prof.get_total_flops() == 2 * (2 * 2 * 4 * 4)
    assert prof.get_total_flops(as_string=True) == "128 "
    assert not model._forward_hooks and not model._forward_pre_hooks  # hooks removed


def test_get_model_profile_bad_input():
    with pytest.raises(ValueError, match="input_shape"):
        get_model_profile(mlp((4, 4)), input_shape=[2, 4])
    with pytest.raises(ValueError, match="args and/or kwargs"):
        get_model_profile(mlp((4, 4)))
    with pytest.raises(TypeError, match="nn.Module"):
        FlopsProfiler(lambda x: x)


def test_config_block_rejects_bad_values():
    base = {"train_micro_batch_size_per_gpu": 1}
    with pytest.raises(ConfigError, match="flops_profiler.top_modules"):
        zerostep.core.config.Config.from_dict({**base, "flops_profiler": {"enabled": True, "top_modules": 0}})
    with pytest.raises(ConfigError, match="did you mean"):
        zerostep.core.config.Config.from_dict({**base, "flops_profiler": {"profile_stp": 1}})


def test_facade_profiles_the_configured_step(tmp_path, capsys):
    out_file = tmp_path / "flops.txt"
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "flops_profiler": {
            "enabled": True,
            "profile_step": 1,
            "output_file": str(out_file),
            "detailed": False,
        },
    }
    model = Net()
    engine, _, _, _ = zerostep.initialize(model=model, config=cfg, compile=False)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        for _ in range(2):
            x, y = torch.randn(2, 5, generator=g), torch.randn(2, 1, generator=g)
            engine.backward(F.mse_loss(engine(x), y))
            engine.step()
        assert out_file.exists() == (step >= 1)  # written at the boundary of global step 1
    text = out_file.read_text()
    # forward of 2 micro-batches of 2 samples: inp 5x7, two 7x7 blocks, head 7x1
    analytic = 2 * 2 * 2 * (5 * 7 + 2 * 7 * 7 + 7 * 1)
    assert engine.flops_profiler.get_total_flops() == 0  # ended after printing
    fwd_line = next(line for line in text.splitlines() if line.startswith("fwd flops per GPU:"))
    assert fwd_line.split(":")[1].strip() == f"{analytic / 1e3:g} K"
    assert "step latency:" in text and "samples/second:" in text
    assert "Detailed Profile" not in text
    assert engine._profile.done and "fwd MACs per GPU" in engine._profile.text


def test_functional_step_profiled_by_train_monitoring(tmp_path):
    import zerostep.core as zs
    from zerostep.core.monitoring.train_loop import TrainMonitoring

    out_file = tmp_path / "fn.txt"
    cfg = zs.Config.from_dict(
        {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
            "flops_profiler": {"enabled": True, "profile_step": 1, "output_file": str(out_file)},
        }
    )
    model = Net()
    engine = zs.initialize(model, cfg, loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]), compile=False)
    state = engine.init()
    watch = TrainMonitoring(cfg, 0, torch.device("cpu"))
    watch.watch_model(model)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        with watch.timing(i):
            state = engine.step(state, (torch.randn(4, 5, generator=g), torch.randn(4, 1, generator=g)))
        assert out_file.exists() == (i >= 1)
    text = out_file.read_text()
    fwd_line = next(line for line in text.splitlines() if line.startswith("fwd flops per GPU:"))
    assert (
        fwd_line.split(":")[1].strip() == f"{2 * 2 * 2 * (5 * 7 + 2 * 7 * 7 + 7) / 1e3:g} K"
    )  # 2 micro-batches
    assert "(inp): Linear(" in text
