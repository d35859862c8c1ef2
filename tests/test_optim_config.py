"""from_config: DeepSpeed's optimizer-block semantics and ConfigError messages."""

from types import SimpleNamespace

import pytest
import torch

import zerostep.optim as zo
from zerostep.errors import ConfigError


def test_adam_is_adamw_unless_adam_w_mode_is_false():
    assert zo.from_config({"type": "Adam"}).name == "adamw"
    assert zo.from_config({"type": "ADAM", "params": {"adam_w_mode": False}}).name == "adam"
    assert zo.from_config({"type": "AdamW", "params": {"adam_w_mode": False}}).name == "adamw"
    opt = zo.from_config({"type": "adam", "params": {"torch_adam": True, "bias_correction": False}})
    assert opt.hyperparams["bias_correction"] is False
    # torch_adam builds torch.optim.AdamW, whose weight_decay default is 0.01 (FusedAdam's is 0).
    assert opt.hyperparams["weight_decay"] == 0.01
    assert zo.from_config({"type": "adam"}).hyperparams["weight_decay"] == 0.0


def test_defaults_follow_deepspeed_and_torch():
    assert zo.from_config({"type": "Adam"}).lr == 1e-3
    lamb = zo.from_config({"type": "Lamb", "params": {"lr": 0.01}})
    assert (lamb.lr, lamb.hyperparams["max_coeff"], lamb.hyperparams["min_coeff"]) == (0.01, 10.0, 0.01)
    assert zo.from_config({"type": "adagrad"}).lr == 1e-2
    assert zo.from_config({"type": "SGD", "params": {"momentum": 0.9}}).hyperparams["momentum"] == 0.9
    assert zo.from_config({"type": "Lion"}).hyperparams["betas"] == (0.9, 0.999)


def test_block_may_be_an_object_and_betas_a_json_list():
    block = SimpleNamespace(type="AdamW", params={"lr": 3e-4, "betas": [0.8, 0.95], "weight_decay": 0.1})
    opt = zo.from_config(block)
    assert opt.lr == 3e-4 and opt.hyperparams["betas"] == (0.8, 0.95)
    p = {"w": torch.ones(2)}
    new_p, _ = opt.update({"w": torch.ones(2)}, opt.init(p), p)
    assert new_p["w"][0] < 1.0


def test_max_grad_norm_points_to_gradient_clipping():
    with pytest.raises(ConfigError, match="gradient_clipping"):
        zo.from_config({"type": "adam", "params": {"max_grad_norm": 1.0}})


def test_unknown_param_is_named():
    with pytest.raises(ConfigError, match="'betaz'"):
        zo.from_config({"type": "adam", "params": {"betaz": [0.9, 0.99]}})
    with pytest.raises(ConfigError, match="momentum"):
        zo.from_config({"type": "adam", "params": {"momentum": 0.9}})


def test_unknown_and_unimplemented_types_list_supported_ones():
    with pytest.raises(ConfigError, match="supported types are .*'lamb'"):
        zo.from_config({"type": "Frobnicate"})  # Adamax is torch.optim's, supported since issue 24
    with pytest.raises(ConfigError, match="DeepSpeed optimizer zerostep does not implement"):
        zo.from_config({"type": "CPUAdam"})
    with pytest.raises(ConfigError, match="missing"):
        zo.from_config({"params": {}})


def test_bad_values_raise_config_error():
    for block in (
        {"type": "adam", "params": {"lr": -1.0}},
        {"type": "adam", "params": {"betas": [0.9]}},
        {"type": "adam", "params": {"betas": [0.9, 1.5]}},
        {"type": "adam", "params": {"amsgrad": True}},
        {"type": "lamb", "params": {"max_coeff": 0.001}},
        {"type": "sgd", "params": {"nesterov": True}},
        {"type": "adam", "params": {"lr": "fast"}},
    ):
        with pytest.raises(ConfigError):
            zo.from_config(block)
