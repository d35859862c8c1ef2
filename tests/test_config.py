"""zerostep.core.config: DeepSpeed 0.19 keys, defaults, batch resolution, errors, "auto", overrides, files."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from blocking_files import fifo_released_after
from hypothesis import given, settings
from hypothesis import strategies as st

from zerostep.core.config import Config, ConfigError, ConfigWarning
from zerostep.optim.registry import (
    MUP_OPTIMIZER_TYPES,
    NATIVE_OPTIMIZER_TYPES,
    OPTIMIZER_TYPES,
    SCHEDULER_TYPES,
)

DS_CONFIGS = Path("/work/shared/ds_configs")


def parse(d, world_size=1, **kw):
    """Parse with ConfigWarnings turned into errors, so a test sees any unexpected warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        return Config.from_dict(d, world_size=world_size, **kw)


def error_of(d, world_size=1, **kw) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        with pytest.raises(ConfigError) as info:
            Config.from_dict(d, world_size=world_size, **kw)
    return str(info.value)


ADAMW = {"type": "AdamW", "params": {"lr": 1e-3}}


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))


def mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def initialize_and_step(c: Config):
    """initialize + init + one step on one process: what a config that parses must get through."""
    import zerostep.core

    engine = zerostep.core.initialize(tiny_model(), c, loss_fn=mse, compile=False)
    rows = c.train_micro_batch_size_per_gpu * c.gradient_accumulation_steps
    x = torch.randn(rows, 4, generator=torch.Generator().manual_seed(0))
    return engine.step(engine.init(), (x, x))


# --- batch triple ------------------------------------------------------------------------------------

TB, MB, GAS = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


@pytest.mark.parametrize(
    "tb, mb, gas, ws, expected",
    [
        (32, 16, 1, 2, (32, 16, 1)),  # all three given
        (32, 16, None, 2, (32, 16, 1)),  # TB, MB -> GAS
        (32, None, 2, 2, (32, 8, 2)),  # TB, GAS -> MB
        (None, 8, 2, 2, (32, 8, 2)),  # MB, GAS -> TB
        (24, 3, None, 1, (24, 3, 8)),
        (64, None, None, 4, (64, 16, 1)),  # TB only
        (None, 4, None, 8, (32, 4, 1)),  # MB only
        (256, 8, None, 1, (256, 8, 32)),
        (5e2, 5.0, None, 1, (500, 5, 100)),  # integral floats are ints
    ],
)
def test_batch_resolution_table(tb, mb, gas, ws, expected):
    d = {key: value for key, value in ((TB, tb), (MB, mb), (GAS, gas)) if value is not None}
    c = parse(d, world_size=ws)
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == expected
    assert c.world_size == ws


@pytest.mark.parametrize(
    "tb, mb, gas, ws, message",
    [
        (33, 17, None, 2, "gradient_accumulation_steps = 0: must be > 0"),  # floor division
        (30, 4, None, 4, "30: must equal train_micro_batch_size_per_gpu * gradient_accumulation_steps"),
        (None, None, 4, 1, "one of train_batch_size or train_micro_batch_size_per_gpu is required"),
        (None, None, None, 1, "is required"),
        (0, 1, 1, 1, "train_batch_size = 0: must be > 0"),
        (-8, 2, None, 1, "train_batch_size = -8: must be > 0"),
        (8, 0, None, 1, "train_micro_batch_size_per_gpu = 0: must be > 0"),
        (8, None, 0, 1, "train_micro_batch_size_per_gpu = 0: must be > 0"),
        (3, None, None, 4, "train_micro_batch_size_per_gpu = 0: must be > 0"),
        (16, 4, 2, 1, "16: must equal"),
        (8, 2, -1, 1, "gradient_accumulation_steps = -1: must be > 0"),
    ],
)
def test_batch_resolution_errors(tb, mb, gas, ws, message):
    d = {key: value for key, value in ((TB, tb), (MB, mb), (GAS, gas)) if value is not None}
    assert message in error_of(d, world_size=ws)


def test_batch_order_matches_deepspeed():
    # TB <= 0 is reported before a mismatched product, as DeepSpeed's _batch_assertion does.
    assert "train_batch_size = 0" in error_of({TB: 0, MB: 4, GAS: 3})


@pytest.mark.parametrize("bad", ["8", True, 2.5, [8], {"n": 8}, float("nan")])
def test_batch_key_wrong_type(bad):
    message = error_of({MB: bad})
    assert "train_micro_batch_size_per_gpu" in message and "must be an integer" in message


@pytest.mark.parametrize("bad", [0, -1, "2", True, 1.5])
def test_world_size_argument_checked(bad):
    assert "world_size" in error_of({MB: 1}, world_size=bad)


def test_world_size_from_process_group(tmp_path):
    import torch.distributed as dist

    assert Config.from_dict({MB: 2}).world_size == 1
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert Config.from_dict({MB: 2}).world_size == dist.get_world_size() == 1
        assert Config.from_dict({MB: 2}, world_size=3).train_batch_size == 6  # argument wins
    finally:
        dist.destroy_process_group()


# --- defaults ----------------------------------------------------------------------------------------


def test_deepspeed_defaults():
    c = parse({MB: 1})
    assert c.gradient_clipping == 1.0 and c.gradient_predivide_factor == 1.0
    assert (c.prescale_gradients, c.wall_clock_breakdown, c.dataloader_drop_last) == (False, False, False)
    assert c.steps_per_print == 10 and c.seed is None
    f = c.fp16
    assert (f.enabled, f.loss_scale, f.initial_scale_power, f.loss_scale_window, f.hysteresis) == (
        False,
        0.0,
        16,
        1000,
        2,
    )
    assert (f.consecutive_hysteresis, f.min_loss_scale, f.auto_cast, f.fp16_master_weights_and_grads) == (
        False,
        1,
        False,
        False,
    )
    assert f.dynamic and not c.bf16.enabled
    z = c.zero_optimization
    assert (z.stage, z.reduce_bucket_size, z.allgather_bucket_size) == (0, 500_000_000, 500_000_000)
    assert (z.overlap_comm, z.contiguous_gradients, z.reduce_scatter, z.allgather_partitions) == (
        False,
        True,
        True,
        True,
    )
    assert z.stage3_prefetch_bucket_size == 50_000_000 and z.stage3_param_persistence_threshold == 100_000
    assert z.stage3_max_live_parameters == z.stage3_max_reuse_distance == 1_000_000_000
    assert z.offload_optimizer is None and z.offload_param is None
    assert c.optimizer is None and c.scheduler is None
    assert c.checkpoint.tag_validation == "Warn" and not c.checkpoint.load_universal
    assert not (c.tensorboard.enabled or c.csv_monitor.enabled or c.wandb.enabled)
    assert c.wandb.project == "deepspeed" and c.tensorboard.job_name == "DeepSpeedJobName"
    assert c.compute_dtype == torch.float32
    assert c.source("fp16.hysteresis") == "default" and c.source(MB) == "user"


def test_overlap_comm_defaults_to_stage_3():
    for stage in range(4):
        c = parse({MB: 1, "zero_optimization": {"stage": stage}})
        assert c.zero_optimization.overlap_comm == (stage == 3)
    c = parse({MB: 1, "zero_optimization": {"stage": 3, "overlap_comm": False}})
    assert not c.zero_optimization.overlap_comm


# --- realistic configs, written for these tests ------------------------------------------------------

ZERO1_FP16 = {
    "train_batch_size": 64,
    "gradient_accumulation_steps": 2,
    "steps_per_print": 100,
    "gradient_clipping": 1.0,
    "optimizer": {
        "type": "Adam",
        "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 100},
    },
    "fp16": {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 12,
        "loss_scale_window": 500,
        "hysteresis": 2,
        "consecutive_hysteresis": True,
        "min_loss_scale": 1,
    },
    "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e8},
}

ZERO2_BF16_OFFLOAD = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 8,
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {
            "total_num_steps": 10000,
            "warmup_num_steps": 500,
            "warmup_max_lr": 1e-4,
            "warmup_type": "linear",
        },
    },
    "zero_optimization": {
        "stage": 2,
        "allgather_partitions": True,
        "allgather_bucket_size": 2e8,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": True,
        "round_robin_gradients": True,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    },
    "wall_clock_breakdown": True,
    "tensorboard": {"enabled": True, "output_path": "runs/", "job_name": "z2"},
}

ZERO3_BF16 = {
    "train_batch_size": 128,
    "train_micro_batch_size_per_gpu": 8,
    "bfloat16": {"enabled": True},  # the legacy spelling
    "optimizer": {"type": "lamb", "params": {"lr": 2e-3, "max_coeff": 0.3, "min_coeff": 0.01}},
    "scheduler": {
        "type": "WarmupCosineLR",
        "params": {"total_num_steps": 5000, "warmup_num_steps": 100, "cos_min_ratio": 0.01},
    },
    "zero_optimization": {
        "stage": 3,
        "stage3_prefetch_bucket_size": 5e7,
        "stage3_param_persistence_threshold": 1e5,
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_fp16_weights_on_model_save": True,
        "sub_group_size": 1e12,
        "offload_param": {"device": "cpu", "pin_memory": True},
        "offload_optimizer": {"device": "cpu"},
    },
    "checkpoint": {"tag_validation": "fail", "load_universal": True},
    "wandb": {"enabled": True, "team": "t", "group": "g", "project": "p"},
    "seed": 1234,
}

FP32_ONECYCLE = {
    "train_micro_batch_size_per_gpu": 16,
    "gradient_clipping": 0.0,
    "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
    "scheduler": {
        "type": "OneCycle",
        "params": {
            "cycle_min_lr": 0.01,
            "cycle_max_lr": 0.1,
            "cycle_first_step_size": 1000,
            "cycle_momentum": True,
            "cycle_min_mom": 0.85,
            "cycle_max_mom": 0.99,
        },
    },
    "csv_monitor": {"enabled": True, "output_path": "csv/", "job_name": "sgd"},
    "dataloader_drop_last": True,
}

FP16_STATIC_RANGE_TEST = {
    "train_batch_size": 32,
    "fp16": {"enabled": True, "loss_scale": 128, "auto_cast": True},
    "optimizer": {"type": "Lion", "params": {"lr": 1e-4, "betas": [0.9, 0.99]}},
    "scheduler": {
        "type": "lrrangetest",
        "params": {
            "lr_range_test_min_lr": 1e-5,
            "lr_range_test_step_size": 200,
            "lr_range_test_staircase": True,
        },
    },
    "zero_optimization": {"stage": 2, "cpu_offload": False},
}


def test_zero1_fp16_warmup():
    c = parse(ZERO1_FP16, world_size=4)
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == (64, 8, 2)
    assert c.fp16.enabled and c.fp16.dynamic and c.fp16.initial_scale_power == 12
    assert c.fp16.consecutive_hysteresis and c.compute_dtype == torch.float16
    assert c.zero_optimization.stage == 1 and c.zero_optimization.reduce_bucket_size == 500_000_000
    assert isinstance(c.zero_optimization.reduce_bucket_size, int)
    assert c.optimizer.type == "adam" and c.optimizer.params["betas"] == (0.9, 0.95)
    assert c.scheduler.type == "WarmupLR" and c.scheduler.params["warmup_num_steps"] == 100
    with pytest.raises(TypeError):
        c.optimizer.params["lr"] = 1.0  # read-only
    assert c.source("fp16.initial_scale_power") == "user" and c.source(MB) == "derived"


def test_zero2_bf16_offload_cpu():
    c = parse(ZERO2_BF16_OFFLOAD, world_size=2)
    assert c.train_batch_size == 64 and c.bf16.enabled and c.compute_dtype == torch.bfloat16
    z = c.zero_optimization
    assert z.stage == 2 and z.allgather_bucket_size == 200_000_000 and z.round_robin_gradients
    assert z.offload_optimizer.device == "cpu" and z.offload_optimizer.pin_memory
    assert c.optimizer.type == "adamw" and c.scheduler.type == "WarmupDecayLR"
    assert c.tensorboard.enabled and c.tensorboard.output_path == "runs/" and c.wall_clock_breakdown


def test_zero3_bf16_legacy_name_aliases_offload():
    c = parse(ZERO3_BF16, world_size=4)
    assert c.gradient_accumulation_steps == 4 and c.bf16.enabled
    z = c.zero_optimization
    assert z.stage == 3 and z.overlap_comm and z.stage3_gather_16bit_weights_on_model_save
    assert z.sub_group_size == 10**12 and z.stage3_prefetch_bucket_size == 50_000_000
    assert z.offload_param.device == "cpu" and z.offload_param.pin_memory
    assert z.offload_optimizer.device == "cpu"
    assert c.checkpoint.tag_validation == "Fail" and c.checkpoint.load_universal
    assert (c.wandb.team, c.wandb.group, c.wandb.project) == ("t", "g", "p")
    assert c.seed == 1234 and c.scheduler.type == "WarmupCosineLR" and c.optimizer.type == "lamb"


def test_fp32_onecycle():
    c = parse(FP32_ONECYCLE, world_size=2)
    assert c.train_batch_size == 32 and c.gradient_clipping == 0.0 and c.compute_dtype == torch.float32
    assert c.scheduler.type == "OneCycle" and c.optimizer.type == "sgd"
    assert c.csv_monitor.enabled and c.dataloader_drop_last


def test_fp16_static_scale_range_test():
    with pytest.warns(ConfigWarning, match="cpu_offload = false"):
        c = Config.from_dict(FP16_STATIC_RANGE_TEST, world_size=2)
    assert c.fp16.loss_scale == 128.0 and not c.fp16.dynamic and c.fp16.auto_cast
    assert c.scheduler.type == "LRRangeTest" and c.optimizer.type == "lion"
    assert c.zero_optimization.offload_optimizer is None


@pytest.mark.filterwarnings("ignore::zerostep.core.config.ConfigWarning")
def test_every_supported_scheduler_is_covered():
    used = {
        Config.from_dict(d, world_size=2).scheduler.type
        for d in (ZERO1_FP16, ZERO2_BF16_OFFLOAD, ZERO3_BF16, FP32_ONECYCLE, FP16_STATIC_RANGE_TEST)
    }
    assert used == set(SCHEDULER_TYPES)


def test_deprecated_and_aliased_zero_keys():
    with pytest.warns(ConfigWarning, match="cpu_offload is deprecated"):
        c = Config.from_dict({MB: 1, "zero_optimization": {"stage": 2, "cpu_offload": True}})
    assert c.zero_optimization.offload_optimizer.device == "cpu"
    with pytest.warns(ConfigWarning, match="deprecated"):
        c = Config.from_dict({MB: 1, "zero_optimization": True, "allgather_size": 1e8})
    assert c.zero_optimization.stage == 1 and c.zero_optimization.allgather_bucket_size == 100_000_000
    with pytest.warns(ConfigWarning):
        assert Config.from_dict({MB: 1, "zero_optimization": False}).zero_optimization.stage == 0
    c = parse(
        {
            MB: 1,
            "zero_optimization": {
                "stage": 3,
                "prefetch_bucket_size": 1000,
                "max_live_parameters": 7,
                "gather_16bit_weights_on_model_save": True,
            },
        }
    )
    z = c.zero_optimization
    assert (z.stage3_prefetch_bucket_size, z.stage3_max_live_parameters) == (1000, 7)
    assert z.stage3_gather_16bit_weights_on_model_save
    assert "disagree" in error_of(
        {MB: 1, "zero_optimization": {"stage3_max_live_parameters": 1, "max_live_parameters": 2}}
    )
    c = parse({MB: 1, "zero_optimization": {"offload_optimizer": {"device": "none"}}})
    assert c.zero_optimization.offload_optimizer is None


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d, needles",
    [
        (
            {"fp16": {"enabled": True}, "bf16": {"enabled": True}},
            ["fp16.enabled", "bf16.enabled", "choose one"],
        ),
        ({"zero_optimization": {"stage": 4}}, ["zero_optimization.stage = 4", "0, 1, 2 or 3"]),
        ({"zero_optimization": {"stage": -1}}, ["zero_optimization.stage = -1"]),
        ({"zero_optimization": {"stage": "2"}}, ["zero_optimization.stage", "integer"]),
        ({"zero_optimization": [1]}, ["zero_optimization = [1]", "JSON object"]),
        ({"fp16": {"enabled": True, "loss_scale": -1}}, ["fp16.loss_scale = -1", ">= 0"]),
        ({"fp16": {"enabled": True, "loss_scale": True}}, ["fp16.loss_scale = true", "not a boolean"]),
        ({"fp16": {"enabled": True, "loss_scale": float("inf")}}, ["fp16.loss_scale = Infinity", "finite"]),
        ({"fp16": {"enabled": True, "loss_scale": float("nan")}}, ["fp16.loss_scale = NaN", "finite"]),
        ({"fp16": {"enabled": True, "loss_scale_window": 0}}, ["fp16.loss_scale_window = 0", "dynamic"]),
        ({"fp16": {"enabled": True, "min_loss_scale": 0}}, ["fp16.min_loss_scale = 0", "dynamic"]),
        ({"fp16": {"enabled": True, "min_loss_scale": True}}, ["fp16.min_loss_scale = true", "integer"]),
        ({"fp16": {"enabled": "yes"}}, ['fp16.enabled = "yes"', "true or false"]),
        ({"fp16": {"enabled": True, "loss_scael": 0}}, ["fp16.loss_scael", "did you mean 'loss_scale'"]),
        ({"zero_optimization": {"stage": 2, "reduce_bucket_sise": 5}}, ["did you mean 'reduce_bucket_size'"]),
        ({"zero_optimization": {"reduce_bucket_size": -1}}, ["reduce_bucket_size = -1", ">= 0"]),
        ({"zero_optimization": {"reduce_bucket_size": 1.5}}, ["reduce_bucket_size = 1.5", "integer"]),
        ({"train_batch_sze": 8}, ["train_batch_sze", "did you mean 'train_batch_size'"]),
        ({"gradient_cliping": 1.0}, ["did you mean 'gradient_clipping'"]),
        ({"gradient_clipping": -1}, ["gradient_clipping = -1", ">= 0"]),
        ({"gradient_clipping": "1.0"}, ['gradient_clipping = "1.0"', "number"]),
        ({"gradient_predivide_factor": 0}, ["gradient_predivide_factor = 0", "> 0"]),
        (
            {"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "max_grad_norm": 1.0}}},
            ["optimizer.params.max_grad_norm", "gradient_clipping"],
        ),
        (
            {"optimizer": {"type": "CPUAdam", "params": {"lr": 1e-3}}},
            ["CPUAdam", "not implemented", "adam, adamw, lamb"],
        ),
        ({"optimizer": {"type": "Adamm"}}, ['optimizer.type = "Adamm"', "did you mean", "supported"]),
        ({"optimizer": {"params": {"lr": 1}}}, ["optimizer", '"type"']),
        ({"optimizer": {"type": "adam", "params": {"lr": "fast"}}}, ["optimizer.params.lr", "number"]),
        ({"optimizer": {"type": "adam", "params": [1]}}, ["optimizer.params", "JSON object"]),
        ({"scheduler": {"type": "CosineLR"}}, ["scheduler.type", "WarmupLR", "WarmupCosineLR"]),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 5}}},
            ["scheduler.params.warmup_num_step", "did you mean 'warmup_num_steps'"],
        ),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, ["total_num_steps", "required"]),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}}, ["log, linear"]),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}}, ["warmup_num_steps = 0"]),
        (
            {"checkpoint": {"tag_validation": "sometimes"}},
            ["checkpoint.tag_validation", "Warn, Ignore, Fail"],
        ),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}},
            ['offload_optimizer.device = "nvme"', "NVMe", "not implemented"],
        ),
        (
            {"zero_optimization": {"offload_param": {"device": "gpu"}}},
            ["offload_param.device", "none, cpu, nvme"],
        ),
        ({"zero_optimization": {"zero_quantized_weights": True}}, ["ZeRO++", "not implemented"]),
        ({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}, ["needs ZeRO stage 1, 2 or 3"]),
        ({"bf16": {"enabled": True}, "bfloat16": {"enabled": True}}, ["bfloat16", "give only one"]),
        ({"gradient_allreduce_op": "sum"}, ["gradient_allreduce_op", "mean"]),
        ({"seed": -3}, ["seed = -3"]),
        ({"steps_per_print": 0}, ["steps_per_print = 0"]),
        ({1: 2}, ["keys must be strings"]),
    ],
)
def test_error_rules(d, needles):
    message = error_of({MB: 1, **d} if MB not in d else d)
    for needle in needles:
        assert needle in message, (needle, message)


def test_not_a_dict():
    for bad in ([], "x", None, 3):
        assert "must be" in error_of(bad)


@pytest.mark.parametrize(
    "key, block",
    [
        ("pipeline", {"stages": 2, "partition": "parameters"}),
        ("sparse_attention", {"mode": "fixed", "block": 16}),
        ("compression_training", {"weight_quantization": {"shared_parameters": {"enabled": True}}}),
        ("data_efficiency", {"data_sampling": {"dynamic_batching": {"enabled": True, "max_tokens": 8}}}),
        ("amp", {"enabled": True, "opt_level": "O1"}),
        ("aio", {"block_size": 1048576}),
        ("autotuning", {"enabled": True}),
        ("compile", {"deepcompile": True}),
    ],
)
def test_unsupported_feature_enabled_is_an_error(key, block):
    message = error_of({MB: 1, key: block})
    assert message.startswith(key) and "not implemented by zerostep" in message


@pytest.mark.parametrize(
    "key, block",
    [
        ("pipeline", {}),
        ("compression_training", {"weight_quantization": {"shared_parameters": {"enabled": False}}}),
        ("amp", {"enabled": False}),
    ],
)
def test_unsupported_feature_disabled_is_a_warning(key, block):
    with pytest.warns(ConfigWarning, match=key):
        Config.from_dict({MB: 1, key: block})


def test_unknown_top_level_key_far_from_any_is_a_warning():
    with pytest.warns(ConfigWarning, match="my_experiment_name"):
        Config.from_dict({MB: 1, "my_experiment_name": "x"})
    with pytest.warns(ConfigWarning, match="zero_allow_untested_optimizer"):
        Config.from_dict({MB: 1, "zero_allow_untested_optimizer": True})
    parse({MB: 1, "zero_allow_untested_optimizer": False})  # DeepSpeed's default: silent


# --- "auto" -----------------------------------------------------------------------------------------


def test_auto_resolved_where_derivable():
    d = {
        TB: "auto",
        MB: 4,
        GAS: 2,
        "gradient_clipping": "auto",
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        },
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-3, "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": 10},
        },
    }
    c = parse(d, world_size=2)
    assert c.train_batch_size == 16 and c.gradient_clipping == 1.0
    assert c.zero_optimization.reduce_bucket_size == 500_000_000
    assert c.zero_optimization.stage3_prefetch_bucket_size == 50_000_000
    assert dict(c.optimizer.params) == {"lr": 1e-3}  # the optimizer's defaults apply
    assert dict(c.scheduler.params) == {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 10}
    assert c.source(TB) == "auto" and c.source("gradient_clipping") == "auto"


def test_auto_not_derivable_says_what_fills_it():
    message = error_of({MB: 2, "optimizer": {"type": "adam", "params": {"lr": "auto"}}})
    assert "optimizer.params.lr" in message and "--learning_rate" in message and "overrides" in message
    message = error_of({TB: "auto", MB: "auto"})
    assert "train_batch_size" in message and "train_micro_batch_size_per_gpu" in message and "auto" in message
    message = error_of({MB: 1, "zero_optimization": {"stage": "auto"}})
    assert "zero_optimization.stage" in message and "auto" in message


def test_overrides_fill_auto():
    d = {TB: "auto", MB: "auto", GAS: "auto", "optimizer": {"type": "adam", "params": {"lr": "auto"}}}
    c = parse(
        d,
        world_size=2,
        overrides={"optimizer": {"params": {"lr": 1e-4}}},
        train_micro_batch_size_per_gpu=3,
        gradient_accumulation_steps=2,
    )
    assert c.optimizer.params["lr"] == 1e-4 and c.train_batch_size == 12
    assert c.source("optimizer.params.lr") == "override" and c.source(TB) == "auto"


# --- overrides ---------------------------------------------------------------------------------------


def test_overrides_merge_and_conflicts():
    base = {TB: 32, "fp16": {"enabled": True}}
    c = parse(
        base, overrides={"fp16": {"initial_scale_power": 8}}, gradient_accumulation_steps=2, world_size=2
    )
    assert c.fp16.initial_scale_power == 8 and c.train_micro_batch_size_per_gpu == 8
    assert c.source("fp16.initial_scale_power") == "override" and c.source("fp16.enabled") == "user"
    parse(base, train_batch_size=32.0)  # same value twice is fine
    message = error_of(base, train_batch_size=64)
    assert "train_batch_size" in message and "the config dict" in message and "keyword overrides" in message
    message = error_of(base, overrides={"fp16": {"enabled": False}})
    assert "fp16.enabled" in message and "the config dict" in message and "overrides" in message
    message = error_of({MB: 1}, overrides={MB: 1}, train_micro_batch_size_per_gpu=3)
    assert "overrides" in message and "keyword overrides" in message
    assert "given twice" in error_of({MB: 1, "fp16": {"enabled": True}}, fp16=True)
    assert "must be a dict" in error_of({MB: 1}, overrides=[1])


# --- files -------------------------------------------------------------------------------------------


def test_from_file_json_and_hjson(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ZERO1_FP16))
    assert Config.from_file(path, world_size=4) == Config.from_dict(ZERO1_FP16, world_size=4)
    assert Config.from_file(str(path), world_size=4).sources["fp16.enabled"] == "file"
    hjson_text = """
    // DeepSpeed reads files with comments and trailing commas
    {
      "train_micro_batch_size_per_gpu": 4,  # hash comments too
      "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8,},
      /* block comment */
      "fp16": {"enabled": true,},
    }
    """
    path.write_text(hjson_text)
    c = Config.from_file(path, world_size=2)
    assert c.train_batch_size == 8 and c.zero_optimization.stage == 2 and c.fp16.enabled


def test_from_file_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="nope.json"):
        Config.from_file(missing)
    dup = tmp_path / "dup.json"
    dup.write_text('{"train_batch_size": 8, "fp16": {"enabled": true, "enabled": false}}')
    with pytest.raises(ConfigError, match="duplicate key 'enabled'"):
        Config.from_file(dup)
    dup.write_text('{"train_batch_size": 8, // comment forces hjson\n "train_batch_size": 8}')
    with pytest.raises(ConfigError, match="duplicate key 'train_batch_size'"):
        Config.from_file(dup)
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": ')
    with pytest.raises(ConfigError, match="bad.json"):
        Config.from_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        Config.from_file(bad)
    with pytest.raises(ConfigError, match="given twice"):
        bad.write_text('{"train_batch_size": 8}')
        Config.from_file(bad, train_batch_size=16)


# --- values the step's arithmetic cannot hold (issue 22, items 5 and 10) -------------------------------

FP16_ON = {"enabled": True}


@pytest.mark.parametrize(
    "d, needles",
    [
        # Accepted before, then an OverflowError inside the first applied step (after the update).
        ({"fp16": {**FP16_ON, "loss_scale_window": 1e30}}, ["fp16.loss_scale_window = 1e+30", "64-bit"]),
        ({"fp16": {**FP16_ON, "loss_scale_window": 2**63}}, ["fp16.loss_scale_window", "64-bit"]),
        ({"fp16": {**FP16_ON, "hysteresis": 1e30}}, ["fp16.hysteresis = 1e+30", "64-bit"]),
        ({"fp16": {**FP16_ON, "hysteresis": -(2**63) - 1}}, ["fp16.hysteresis", "integer"]),
        ({"fp16": {**FP16_ON, "min_loss_scale": 10**39}}, ["fp16.min_loss_scale", "integer in"]),
        ({"fp16": {**FP16_ON, "loss_scale": 1e300}}, ["fp16.loss_scale = 1e+300", "float32"]),
        ({"fp16": {**FP16_ON, "loss_scale": 10**400}}, ["fp16.loss_scale", "float32"]),
        ({"fp16": {**FP16_ON, "initial_scale_power": 10**400}}, ["fp16.initial_scale_power", "[-126, 127]"]),
        ({"fp16": {**FP16_ON, "initial_scale_power": 1e30}}, ["fp16.initial_scale_power", "[-126, 127]"]),
        # The same bounds hold with fp16 off: the scaler state is built from them either way.
        ({"fp16": {"hysteresis": 1e30}}, ["fp16.hysteresis", "64-bit"]),
        ({"gradient_clipping": 10**400}, ["gradient_clipping", "float32"]),
        ({"gradient_clipping": 1e300}, ["gradient_clipping = 1e+300", "float32"]),
        ({"gradient_predivide_factor": 1e-300}, ["gradient_predivide_factor", "1.2e-38"]),
        ({"seed": 2**64}, ["seed", "64-bit"]),
        ({"steps_per_print": 10**400}, ["steps_per_print", "64-bit"]),
        ({"zero_optimization": {"reduce_bucket_size": 1e30}}, ["zero_optimization.reduce_bucket_size"]),
        ({"zero_optimization": {"stage": 10**400}}, ["zero_optimization.stage"]),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 10**400}}},
            ["offload_optimizer.ratio"],
        ),
        ({TB: 10**400}, [TB]),
        ({"tensorboard": {"enabled": False, "output_path": "runs\x00"}}, ["tensorboard.output_path", "NUL"]),
    ],
)
def test_values_beyond_the_step_arithmetic_are_config_errors(d, needles):
    message = error_of({MB: 1, **d} if MB not in d and TB not in d else d)
    for needle in needles:
        assert needle in message, (needle, message)


def test_fp16_counters_at_the_int64_limit_run_a_step():
    # The boundary the rule above draws is one the step really holds.
    fp16 = {**FP16_ON, "loss_scale_window": 2**63 - 1, "hysteresis": 2**63 - 1, "min_loss_scale": 1}
    state = initialize_and_step(parse({MB: 2, "fp16": fp16, "optimizer": ADAMW}))
    assert int(state.step) == 1


@pytest.mark.parametrize(
    "params, needles",
    [
        ({"betas": [0.5, None]}, ["optimizer.params.betas[1]", "number"]),
        ({"betas": ["auto", 0.9]}, ["optimizer.params.betas[0]", "'auto'", "number"]),
        ({"betas": [0.5]}, ["optimizer.params.betas", "2 numbers"]),
        ({"betas": 0.9}, ["optimizer.params.betas", "2 numbers"]),
        ({"betas": [0.9, 1.0]}, ["optimizer.params.betas[1]", "< 1.0"]),
        ({"betas": [0.9, 10**400]}, ["optimizer.params.betas[1]", "float32"]),
        ({"lr": 10**400}, ["optimizer.params.lr", "float32"]),
        ({"lr": 1e300}, ["optimizer.params.lr", "float32"]),
        ({"eps": 1e39}, ["optimizer.params.eps", "float32"]),
        ({"weight_decay": True}, ["optimizer.params.weight_decay", "number"]),
        ({"bias_correction": 1}, ["optimizer.params.bias_correction", "true or false"]),
        ({"torch_adam": "yes"}, ["optimizer.params.torch_adam", "true or false"]),
        ({"amsgrad": True}, ["optimizer.params.amsgrad", "unsupported"]),
        ({"momentum": 0.9}, ["optimizer.params", "unknown key", "momentum"]),
    ],
)
def test_optimizer_params_are_checked_when_the_config_is_read(params, needles):
    # Before: Config accepted these and initialize() raised TypeError / ValueError / OverflowError.
    message = error_of({MB: 1, "optimizer": {"type": "AdamW", "params": params}})
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(
    "kind, params, needle",
    [
        # torch.full(..., 1e308) for a float32 accumulator raised RuntimeError in engine.init().
        ("Adagrad", {"initial_accumulator_value": 1e308}, "optimizer.params.initial_accumulator_value"),
        ("Adagrad", {"initial_accumulator_value": -1}, "optimizer.params.initial_accumulator_value"),
        ("Adagrad", {"lr_decay": 10**400}, "optimizer.params.lr_decay"),
        ("SGD", {"momentum": 1e39}, "optimizer.params.momentum"),
        ("SGD", {"nesterov": True}, "optimizer.params.nesterov"),
        ("Lion", {"betas": [0.9, None]}, "optimizer.params.betas[1]"),
        ("Lamb", {"max_coeff": 1e300}, "optimizer.params.max_coeff"),
        ("SGD", {"betas": [0.9, 0.99]}, "optimizer.params"),
    ],
)
def test_other_optimizers_params_are_checked(kind, params, needle):
    assert needle in error_of({MB: 1, "optimizer": {"type": kind, "params": params}})


@pytest.mark.parametrize(
    "sched, needles",
    [
        # KeyError '' before: "auto" left the type empty and the params table was indexed with it.
        ({"type": "auto"}, ['"auto" values', "scheduler.type"]),
        ({"type": "auto", "params": {"warmup_num_steps": 10}}, ['"auto" values', "scheduler.type"]),
        # Accepted before, then a ConfigError (or TypeError) only at initialize().
        ({"type": "WarmupLR", "params": {"last_batch_iteration": 5}}, ["last_batch_iteration = 5", "-1"]),
        ({"type": "WarmupLR", "params": {"warmup_max_lr": [1e-3, 2e-3]}}, ["warmup_max_lr", "one learning"]),
        ({"type": "WarmupLR", "params": {"warmup_num_steps": 10**400}}, ["warmup_num_steps", "64-bit"]),
        ({"type": "WarmupLR", "params": {"warmup_max_lr": 10**400}}, ["warmup_max_lr", "float32"]),
        (
            {"type": "OneCycle", "params": {"cycle_min_lr": 0, "cycle_max_lr": 1, "cycle_max_mom": 1.5}},
            ["cycle_max_mom = 1.5", "[0, 1)"],
        ),
        (
            {"type": "OneCycle", "params": {"cycle_min_lr": 0, "cycle_max_lr": 1, "decay_step_size": -2}},
            ["decay_step_size = -2", ">= 0"],
        ),
        (
            {"type": "OneCycle", "params": {"cycle_min_lr": 0, "cycle_max_lr": 1, "decay_lr_rate": -1}},
            ["decay_lr_rate = -1", ">= 0"],
        ),
        (
            {"type": "LRRangeTest", "params": {"lr_range_test_step_rate": 1e300}},
            ["lr_range_test_step_rate", "float32"],
        ),
    ],
)
def test_scheduler_values_are_config_errors(sched, needles):
    message = error_of({MB: 1, "optimizer": ADAMW, "scheduler": sched})
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(
    "sched",
    [
        {"type": "WarmupLR", "params": {"warmup_num_steps": 10.0, "warmup_max_lr": [1e-3]}},
        {
            "type": "OneCycle",
            "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": [1e-3], "decay_step_size": 2.0},
        },
        {"type": "WarmupDecayLR", "params": {"total_num_steps": 1e2, "last_batch_iteration": -1}},
    ],
)
def test_accepted_scheduler_values_are_what_initialize_reads(sched):
    # These parsed, then initialize() refused 10.0 ("a positive integer") and [1e-3] ("a number").
    c = parse({MB: 2, "optimizer": ADAMW, "scheduler": sched})
    assert int(initialize_and_step(c).step) == 1


def nest(value, depth, kind="dict"):
    for _ in range(depth):
        value = {"a": value} if kind == "dict" else [value]
    return value


@pytest.mark.parametrize("depth", [101, 500, 100_000])
@pytest.mark.parametrize("kind", ["dict", "list"])
def test_deep_nesting_is_a_config_error(depth, kind):
    # RecursionError before, from the first recursive reader (merge, freeze, show...).
    message = error_of({MB: 1, "optimizer": {"type": "adamw", "params": {"x": nest(1, depth, kind)}}})
    assert "more than 100 levels" in message and message.startswith("the config dict: optimizer.params.x")
    assert "levels" in error_of({MB: 1}, overrides={"wandb": nest(1, depth, kind)})


def test_nesting_up_to_the_limit_is_read():
    # 100 levels in all, counting the top dict: refused for unknown keys, not for the depth.
    message = error_of({MB: 1, "zero_optimization": {"stage": 0, "x": nest(1, 98)}})
    assert "zero_optimization.x" in message and "unknown key" in message


def test_a_dict_holding_itself_is_a_config_error():
    d = {MB: 1, "wandb": {}}
    d["wandb"]["me"] = d
    assert "wandb.me contains itself" in error_of(d)
    shared = {"enabled": False}  # shared, not cyclic: read as two copies
    assert parse({MB: 1, "tensorboard": shared, "csv_monitor": shared}).csv_monitor.enabled is False


@pytest.mark.parametrize("depth", [500, 100_000])
def test_deep_nesting_in_a_file_is_a_config_error_naming_the_file(tmp_path, depth):
    path = tmp_path / "deep.json"
    path.write_text('{"train_batch_size": 1, "x": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ConfigError, match="deep.json.*more than 100 levels"):
        Config.from_file(path)
    path.write_text('{"train_batch_size": 1, // hjson\n "x": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ConfigError, match="deep.json.*more than 100 levels"):
        Config.from_file(path)


def test_huge_integers_in_a_file_are_config_errors(tmp_path):
    path = tmp_path / "big.json"
    path.write_text('{"train_batch_size": 1, "gradient_clipping": 1' + "0" * 400 + "}")
    with pytest.raises(ConfigError, match="gradient_clipping"):
        Config.from_file(path)
    # Beyond Python's 4300-digit int/str limit json.loads itself refuses; still a ConfigError.
    path.write_text('{"train_batch_size": 1, "gradient_clipping": 1' + "0" * 5000 + "}")
    with pytest.raises(ConfigError, match="big.json"):
        Config.from_file(path)
    # A hand-built dict can hold one; the message must still print it.
    message = error_of({MB: 1, "gradient_clipping": 10**5000})
    assert "gradient_clipping = <an integer of about 5000 digits>" in message


def test_a_path_with_a_nul_byte_is_a_config_error():
    import zerostep.core

    with pytest.raises(ConfigError, match="cannot be opened: embedded null byte"):
        Config.from_file("ds\x00.json")
    with pytest.raises(ConfigError, match="embedded null byte"):
        zerostep.core.initialize(tiny_model(), "\x00", loss_fn=mse, compile=False)


@pytest.mark.parametrize("content", ["", "  \n\t\n", "// only a comment\n", "# hjson comment\n"])
def test_an_empty_config_file_is_a_config_error_naming_it(tmp_path, content):
    # It was read as {} and reported as a missing batch size, without the file's name.
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"config file '.*empty\.json' (is empty|holds no config)"):
        Config.from_file(path)
    path.write_text("{}")  # an explicit empty object is a config, one that lacks the batch size
    with pytest.raises(ConfigError, match="batch size"):
        Config.from_file(path)


def test_a_fifo_or_a_directory_is_refused_not_waited_on(tmp_path):
    # A FIFO blocked in open() forever (no writer); it is refused without being waited on.
    with fifo_released_after(tmp_path / "ds.json") as fifo:
        with pytest.raises(ConfigError, match=r"ds\.json' is not a regular file \(a FIFO\)"):
            Config.from_file(fifo)
    with pytest.raises(ConfigError, match=r"is not a regular file \(a directory\)"):
        Config.from_file(tmp_path)


# --- hypothesis ---------------------------------------------------------------------------------------

KEY_NAMES = [
    TB,
    MB,
    GAS,
    "fp16",
    "bf16",
    "bfloat16",
    "zero_optimization",
    "optimizer",
    "scheduler",
    "type",
    "params",
    "enabled",
    "loss_scale",
    "initial_scale_power",
    "loss_scale_window",
    "hysteresis",
    "min_loss_scale",
    "stage",
    "reduce_bucket_size",
    "offload_optimizer",
    "offload_param",
    "device",
    "cpu_offload",
    "lr",
    "gradient_clipping",
    "checkpoint",
    "tag_validation",
    "pipeline",
    "sparse_attention",
    "wandb",
    "activation_checkpointing",
    "partition_activations",
    "stage3_max_live_parameters",
    "max_grad_norm",
    "warmup_num_steps",
    "total_num_steps",
    "seed",
    "steps_per_print",
    "data_types",
    "grad_accum_dtype",
]
# Values at and beyond what int64 / float32 arithmetic holds, and beyond Python's int/str limit.
EDGE_NUMBERS = st.sampled_from(
    [
        2**31,
        2**63 - 1,
        2**63,
        -(2**63) - 1,
        2**64,
        10**30,
        10**400,
        -(10**400),
        1e30,
        3.5e38,
        -3.5e38,
        1e300,
        1e308,
        1e-300,
        5e-324,
        0.5,
        1.0,
        0.999,
    ]
) | st.builds(pow, st.just(10), st.just(5000))  # built, not listed: such an int has no repr
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.integers(),
    EDGE_NUMBERS,
    st.floats(allow_nan=True),
    st.sampled_from(
        ["auto", "cpu", "nvme", "Adam", "WarmupLR", "OneBitAdam", "fail", "fp32", "", "\x00", "runs\x00/x"]
    ),
    st.text(max_size=6),  # includes NUL and other control characters
)
keys = st.one_of(st.sampled_from(KEY_NAMES), st.text(max_size=8))
shallow_json_like = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        # nulls among numbers, as in "betas": [0.5, null]
        | st.lists(st.one_of(st.none(), EDGE_NUMBERS, st.floats(0, 1)), min_size=1, max_size=3)
        | st.dictionaries(keys, inner, max_size=5)
    ),
    max_leaves=25,
)
# Nesting around the limit (100 levels) and far beyond what recursion could walk.
deep_json_like = st.builds(
    nest,
    shallow_json_like,
    st.sampled_from([20, 98, 99, 100, 101, 500, 3000]),
    st.sampled_from(["dict", "list"]),
)
json_like = st.one_of(shallow_json_like, deep_json_like)


def config_or_config_error(d, world_size, step=True):
    """The property: a Config or a ConfigError with a message, nothing else; and a Config that parses
    (for one process, with a batch small enough to build) initializes and takes a step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        try:
            c = Config.from_dict(d, world_size=world_size)
        except ConfigError as error:
            assert str(error)
            return None
    product = c.train_micro_batch_size_per_gpu * c.gradient_accumulation_steps * c.world_size
    assert c.train_batch_size == product
    if step and c.world_size == 1 and product <= 64:
        step_accepted_config(c)
    return c


def step_accepted_config(c: Config) -> None:
    import dataclasses

    from zerostep.core.config import OptimizerConfig
    from zerostep.core.precision import LossScaleError

    if c.optimizer is None:  # the engine needs an optimizer block; Config (as DeepSpeed) does not
        c = dataclasses.replace(c, optimizer=OptimizerConfig(type="adamw"))
    try:
        state = initialize_and_step(c)
    except LossScaleError:
        return  # fp16 overflow at min_loss_scale: the documented runtime failure, not a config's
    except ConfigError:
        # Muon's and torch.optim's params are checked when initialize builds them for the model's
        # parameters; zerostep's own optimizers are built (and so checked) when the config is read.
        if c.optimizer.type in NATIVE_OPTIMIZER_TYPES:
            raise
        return
    assert int(state.step) == 1


@settings(max_examples=120)
@given(st.dictionaries(keys, json_like, max_size=8), st.sampled_from([None, 1, 2, 3]))
def test_any_json_like_dict_gives_config_or_config_error(d, world_size):
    config_or_config_error(d, world_size)


BETAS_TYPES = ("adam", "adamw", "lamb", "lion")  # SGD and Adagrad take no betas (a ConfigError)
# mup's optimizers need the mup package and a model whose parameters carry mup's `infshape`.
STEPPABLE_OPTIMIZER_TYPES = tuple(kind for kind in OPTIMIZER_TYPES if kind not in MUP_OPTIMIZER_TYPES)


@st.composite
def valid_configs(draw, world_sizes=(1, 2, 4)):
    ws = draw(st.sampled_from(world_sizes))
    mb, gas = draw(st.integers(1, 8)), draw(st.integers(1, 4))
    given_keys = draw(st.sampled_from([(TB, MB, GAS), (TB, MB), (TB, GAS), (MB, GAS), (TB,), (MB,)]))
    if len(given_keys) == 1:
        gas = 1
    triple = {TB: mb * gas * ws, MB: mb, GAS: gas}
    d = {key: triple[key] for key in given_keys}
    precision = draw(st.sampled_from(["fp32", "fp16", "bf16"]))
    if precision == "fp16":
        d["fp16"] = {
            "enabled": True,
            "loss_scale": draw(st.sampled_from([0, 0.0, 1024])),
            "initial_scale_power": draw(st.integers(0, 32)),
            "loss_scale_window": draw(st.integers(1, 2000)),
            "hysteresis": draw(st.integers(1, 4)),
            "consecutive_hysteresis": draw(st.booleans()),
            "min_loss_scale": draw(st.integers(1, 8)),
        }
    elif precision == "bf16":
        d[draw(st.sampled_from(["bf16", "bfloat16"]))] = {"enabled": True}
    stage = draw(st.integers(0, 3))
    zero = {"stage": stage, "reduce_bucket_size": draw(st.sampled_from([5e8, 2e8, 7000000, "auto"]))}
    if draw(st.booleans()):
        zero["overlap_comm"] = draw(st.booleans())
    if stage and draw(st.booleans()):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": draw(st.booleans())}
    if stage == 3 and draw(st.booleans()):
        zero["offload_param"] = {"device": "cpu"}
        zero["stage3_gather_fp16_weights_on_model_save"] = True
    d["zero_optimization"] = zero
    if draw(st.booleans()):
        kind = draw(st.sampled_from(STEPPABLE_OPTIMIZER_TYPES))
        d["optimizer"] = {
            "type": draw(st.sampled_from([kind, kind.upper(), kind.capitalize()])),
            "params": {"lr": draw(st.floats(1e-6, 1.0))},
        }
        if kind in BETAS_TYPES:
            d["optimizer"]["params"]["betas"] = [0.9, 0.999]
    if draw(st.booleans()):
        d["scheduler"] = draw(
            st.sampled_from(
                [
                    {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_type": "linear"}},
                    {"type": "warmupdecaylr", "params": {"total_num_steps": 100}},
                    {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "cos_min_ratio": 0.1}},
                    {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": [1e-3]}},
                    {"type": "LRRangeTest", "params": {}},
                ]
            )
        )
    d["gradient_clipping"] = draw(st.sampled_from([0, 0.5, 1.0, "auto"]))
    if draw(st.booleans()):
        d["seed"] = draw(st.integers(0, 2**31))
    d["checkpoint"] = {"tag_validation": draw(st.sampled_from(["warn", "IGNORE", "Fail"]))}
    d["wandb"] = {"enabled": draw(st.booleans()), "team": draw(st.sampled_from([None, "team"]))}
    return d, ws


@settings(max_examples=60)
@given(valid_configs())
def test_round_trip_config_dict_config(case):
    d, ws = case
    c = parse(d, world_size=ws)
    plain = c.to_dict()
    assert json.loads(json.dumps(plain)) == plain  # pure JSON
    again = parse(plain, world_size=ws)
    assert again == c and again.to_dict() == plain
    assert all(source in ("user", "default") for source in again.sources.values())


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))


def replace_one_value(d, data):
    path = data.draw(st.sampled_from([p for p in _paths(d) if p]))
    target = d
    for key in path[:-1]:
        target = target[key]
    if data.draw(st.booleans()):
        target[path[-1]] = data.draw(json_like)
    else:
        target[data.draw(keys)] = data.draw(json_like)


@settings(max_examples=120)
@given(valid_configs(), st.data())
def test_valid_config_with_one_value_replaced_gives_config_or_config_error(case, data):
    # Reaches deep into the blocks, where a random dict rarely gets past the top level.
    d, ws = case
    replace_one_value(d, data)
    config_or_config_error(d, ws, step=False)


@settings(max_examples=25, deadline=None)
@given(valid_configs(world_sizes=(1,)), st.data())
def test_config_that_parses_initializes_and_steps(case, data):
    # Every accepted config builds an engine that takes a step (2x Linear(4, 4), one process): no
    # value may pass the config and fail inside initialize, init or step.
    d, _ = case
    if data.draw(st.booleans()):
        replace_one_value(d, data)
    config_or_config_error(d, 1)


def test_to_dict_is_deepspeed_shaped():
    plain = parse(ZERO3_BF16, world_size=4).to_dict()
    assert plain["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "bfloat16" not in plain and plain["bf16"]["enabled"] is True
    assert plain["optimizer"] == {"type": "lamb", "params": {"lr": 2e-3, "max_coeff": 0.3, "min_coeff": 0.01}}
    assert plain[TB] == 128 and plain[GAS] == 4 and "world_size" not in plain
    assert "optimizer" not in parse({MB: 1}).to_dict()


# --- real DeepSpeed configs -----------------------------------------------------------------------------

# file -> (warning substrings expected, or the ConfigError substrings expected)
REAL_CONFIGS_OK = {
    "ds_examples_sdma_zero3.json": [],
    "dsex_bf16_master_weight_full_z3.json": [],  # bf16 master + torch_autocast
    "ds_tests_gpt2_bs4_zero2_cpu_offload.json": ["cpu_offload is deprecated"],
    "ds_tests_gpt2_bs8_zero2_gas3.json": [
        "activation_checkpointing.partition_activations",
        "activation_checkpointing.contiguous_memory_optimization",
    ],
    "dsex_bingbertsquad_bsz24.json": [],
    "dsex_bing_bert_onebitadam_nccl.json": [],  # 1-bit Adam (issue 15)
    "dsex_imagenet_fp16_z1.json": ["zero_allow_untested_optimizer", "cuda_visible_devices"],
    "dsex_pipeline_parallelism.json": [],  # named for the example; the file holds no pipeline block
    "megads_universal_checkpointing_z1_bf16.json": [],
}
REAL_CONFIGS_ERROR = {
    "dsex_bing_bert_lamb_bsz64k.json": ["sparse_attention", "not implemented"],
    "hf_transformers_tests_zero2_auto.json": ["optimizer.params.lr", "--learning_rate", "overrides"],
    "hf_transformers_tests_zero3_offload.json": ["train_micro_batch_size_per_gpu is required"],
    "megads_curriculum_z1_baseline.json": ["max_grad_norm", "gradient_clipping"],
}
needs_ds_configs = pytest.mark.skipif(not DS_CONFIGS.is_dir(), reason="no /work/shared/ds_configs here")


@needs_ds_configs
def test_real_configs_are_all_classified():
    present = {path.name for path in DS_CONFIGS.glob("*.json")}
    assert present <= set(REAL_CONFIGS_OK) | set(REAL_CONFIGS_ERROR)


@needs_ds_configs
@pytest.mark.parametrize("name", sorted(REAL_CONFIGS_OK))
def test_real_config_parses(name):
    path = DS_CONFIGS / name
    if not path.exists():
        pytest.skip(f"{name} absent")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        c = Config.from_file(path)
    messages = " | ".join(str(w.message) for w in caught if issubclass(w.category, ConfigWarning))
    for needle in REAL_CONFIGS_OK[name]:
        assert needle in messages
    if not REAL_CONFIGS_OK[name]:
        assert messages == ""
    assert Config.from_dict(c.to_dict(), world_size=c.world_size) == c


@needs_ds_configs
def test_real_config_values():
    def load(name, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            return Config.from_file(DS_CONFIGS / name, **kw)

    c = load("ds_examples_sdma_zero3.json", world_size=8)
    assert (c.train_batch_size, c.zero_optimization.stage, c.compute_dtype) == (8, 3, torch.bfloat16)
    assert c.zero_optimization.sub_group_size == 10**12 and c.scheduler.type == "WarmupLR"
    c = load("ds_tests_gpt2_bs4_zero2_cpu_offload.json", world_size=2)
    assert c.train_micro_batch_size_per_gpu == 2 and c.zero_optimization.offload_optimizer.device == "cpu"
    assert c.zero_optimization.reduce_bucket_size == 7_000_000 and c.fp16.dynamic
    assert load("dsex_bingbertsquad_bsz24.json").gradient_accumulation_steps == 8
    c = load("dsex_imagenet_fp16_z1.json")
    assert c.gradient_clipping == 0 and c.fp16.auto_cast and c.optimizer.params["betas"] == (0.8, 0.999)
    assert load("dsex_pipeline_parallelism.json").gradient_accumulation_steps == 32
    assert load("megads_universal_checkpointing_z1_bf16.json").data_types.grad_accum_dtype == "fp32"
    # The HF zero-3 file leaves the batch to the Trainer; an override fills it.
    c = load("hf_transformers_tests_zero3_offload.json", train_micro_batch_size_per_gpu=2, world_size=2)
    assert c.train_batch_size == 4 and c.zero_optimization.stage3_gather_16bit_weights_on_model_save
    assert c.zero_optimization.offload_param.device == "cpu" and c.zero_optimization.reduce_bucket_size == 0


@needs_ds_configs
@pytest.mark.parametrize("name", sorted(REAL_CONFIGS_ERROR))
def test_real_config_rejected_clearly(name):
    path = DS_CONFIGS / name
    if not path.exists():
        pytest.skip(f"{name} absent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        with pytest.raises(ConfigError) as info:
            Config.from_file(path)
    for needle in REAL_CONFIGS_ERROR[name]:
        assert needle in str(info.value), (needle, str(info.value))


@needs_ds_configs
def test_hf_auto_config_with_overrides():
    c = Config.from_file(
        DS_CONFIGS / "hf_transformers_tests_zero2_auto.json",
        world_size=2,
        overrides={
            "optimizer": {"params": {"lr": 5e-5}},
            "scheduler": {"params": {"warmup_num_steps": 50}},
            "fp16": {"enabled": False},
            "bf16": {"enabled": True},
        },
        train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=2,
    )
    assert (c.train_batch_size, c.compute_dtype, c.gradient_clipping) == (16, torch.bfloat16, 1.0)
    assert c.scheduler.params["warmup_max_lr"] == 5e-5 and math.isclose(c.optimizer.params["lr"], 5e-5)


def test_overlap_param_gather_is_zerosteps_own_key_off_by_default():
    assert not parse({MB: 1, "zero_optimization": {"stage": 2}}).zero_optimization.overlap_param_gather
    c = parse({MB: 1, "zero_optimization": {"stage": 2, "overlap_param_gather": True}})
    assert c.zero_optimization.overlap_param_gather
    with pytest.raises(ConfigError, match="overlap_param_gather"):
        parse({MB: 1, "zero_optimization": {"stage": 2, "overlap_param_gather": "yes please"}})
