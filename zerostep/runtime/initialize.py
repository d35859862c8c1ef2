"""``zerostep.initialize``: DeepSpeed's calling convention onto ``zerostep.core.initialize``.

What it translates, in order (DeepSpeed 0.19's ``deepspeed.initialize`` and ``DeepSpeedEngine``):

1. the process group (torchrun's environment, or one process);
2. the config from ``args.deepspeed_config`` / ``config`` / ``config_params``;
3. the optimizer: a client ``torch.optim.Optimizer`` (or a callable taking the parameters) replaces the
   config's ``optimizer`` block, as in DeepSpeed ("this overrides any optimizer definition in the
   config"); its class and each group's hyperparameters become a zerostep optimizer block and param
   groups (``client_optimizer.py``). Without one, the config's block runs over ``model_parameters``
   (parameters or group dicts; default every trainable parameter);
4. the LR scheduler: a client scheduler (or callable taking the optimizer), else the config's block as a
   DeepSpeed scheduler object over the returned optimizer;
5. the data loader over ``training_data``.

It returns DeepSpeed's 4-tuple ``(engine, optimizer, dataloader, lr_scheduler)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from zerostep import optim
from zerostep.core import model_parallel
from zerostep.core.config import Config
from zerostep.core.engine import Engine
from zerostep.core.monitoring.comms_logger import eager_for_comms_logger
from zerostep.core.param_groups import ParamGroup
from zerostep.core.pipeline_module import PipelineModule
from zerostep.runtime.client_optimizer import optimizer_block, param_groups_of
from zerostep.runtime.engine import DeepSpeedEngine, frozen_group_spec
from zerostep.runtime.lr_schedules import scheduler_from_config
from zerostep.runtime.pipe_engine import build_pipeline
from zerostep.runtime.zero_optimizer import ZeroOptimizer

# zerostep optimizer param -> torch param-group key, for building groups of a config optimizer
_CONFIG_GROUP_KEYS = {
    "lr": "lr",
    "weight_decay": "weight_decay",
    "betas": "betas",
    "eps": "eps",
    "momentum": "momentum",
}


def build(
    *,
    model: nn.Module,
    config_dict: dict,
    optimizer: Any,
    model_parameters: Iterable | None,
    lr_scheduler: Any,
    world_size: int | None,
    compile: bool,
    mesh: Any = None,
) -> tuple[DeepSpeedEngine, ZeroOptimizer, Any]:
    """(engine, optimizer, lr_scheduler) for an already merged config dict. ``world_size``: the
    data-parallel size (None: the process group's over ``tensor_parallel.autotp_size``); ``mesh``: an
    mpu's (core/model_parallel.py)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"initialize(model=...) must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, PipelineModule):  # zerostep/runtime/pipe_engine.py
        if mesh is not None:
            raise ValueError("initialize(mpu=...) with a PipelineModule: the pipeline builds its own groups")
        return build_pipeline(model, dict(config_dict), optimizer, model_parameters, lr_scheduler, compile)
    config_dict = dict(config_dict)
    basic = None
    if optimizer is not None:
        if isinstance(optimizer, torch.optim.Optimizer):
            basic = optimizer
        elif callable(optimizer):
            params = list(model_parameters) if model_parameters is not None else list(model.parameters())
            basic = optimizer(params)
            if not isinstance(basic, torch.optim.Optimizer):
                raise TypeError(f"the optimizer callable returned {type(basic).__name__}, not an Optimizer")
        else:
            raise TypeError(
                f"initialize(optimizer=...) must be a torch.optim.Optimizer or a callable taking the "
                f"parameters, got {type(optimizer).__name__}"
            )
        basic.param_groups[:] = [g for g in basic.param_groups if len(g["params"]) != 0]
        block, options = optimizer_block(basic)
        config_dict["optimizer"] = block
        groups = param_groups_of(model, basic.param_groups, options, "optimizer.param_groups")
    cfg = Config.from_dict(config_dict, world_size=world_size)
    if cfg.optimizer is None:
        raise ValueError(
            "initialize: no optimizer; pass optimizer= or add an 'optimizer' block to the config "
            '(e.g. {"type": "AdamW", "params": {"lr": 1e-3}})'
        )
    if basic is None:
        group_dicts, groups = _config_groups(model, cfg, model_parameters)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    named = {n for g in groups for n in g.names}
    unnamed = [n for n in trainable if n not in named]
    frozen_index = None
    if unnamed:
        frozen_index = len(groups)
        groups = [*groups, frozen_group_spec(unnamed)]
    needs_groups = len(groups) > 1
    compile = eager_for_comms_logger(cfg, compile)  # the comms logger measures eager collectives only
    mesh = model_parallel.mesh_for(cfg, None, mesh)  # the world, the mpu's or the AutoTP mesh
    core = Engine(model, cfg, compile=compile, param_groups=groups if needs_groups else None, mesh=mesh)
    state = core.init(seed=int(cfg.seed or 0))
    wrapper = ZeroOptimizer(None, group_dicts if basic is None else [], basic)
    scheduler = _scheduler(lr_scheduler, basic if basic is not None else wrapper, cfg)
    engine = DeepSpeedEngine(core, state, wrapper, scheduler, None, frozen_index)
    wrapper._engine = engine
    return engine, wrapper, scheduler


def _config_groups(
    model: nn.Module, cfg: Config, model_parameters: Iterable | None
) -> tuple[list[dict[str, Any]], list[ParamGroup]]:
    """Torch-style group dicts over the model's parameter objects, with the config optimizer's values
    as defaults (a group dict may override lr / weight_decay), and the matching ``ParamGroup``s."""
    hyper = dict(cfg.optimizer.params or {})
    defaults = {tkey: hyper[zkey] for zkey, tkey in _CONFIG_GROUP_KEYS.items() if zkey in hyper}
    built = optim.from_config(cfg.optimizer)  # the optimizer's own defaults for what the block omits
    defaults.setdefault("lr", built.lr)
    if "betas" in built.hyperparams:
        defaults.setdefault("betas", tuple(built.hyperparams["betas"]))
    defaults.setdefault("weight_decay", 0.0)
    if model_parameters is None:
        raw: list[Any] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    else:
        raw = list(model_parameters)
        if raw and isinstance(raw[0], torch.Tensor):
            raw = [{"params": raw}]
    dicts = []
    for group in raw:
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(
                f"model_parameters must be parameters or dicts with 'params', got {type(group).__name__}"
            )
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if params:
            dicts.append({**defaults, **{k: v for k, v in group.items() if k != "params"}, "params": params})
    keys = ("lr", "weight_decay", "betas", "eps", "momentum")
    groups = param_groups_of(model, dicts, lambda g: {k: g[k] for k in keys if k in g}, "model_parameters")
    return dicts, groups


def _scheduler(client: Any, optimizer: Any, cfg: Config) -> Any:
    if client is None:
        return scheduler_from_config(cfg.scheduler, optimizer)
    if hasattr(client, "step") and hasattr(client, "state_dict"):
        return client
    if isinstance(client, Callable):
        return client(optimizer)
    raise TypeError(f"lr_scheduler must be a scheduler or a callable taking the optimizer, got {client!r}")
