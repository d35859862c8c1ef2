"""zerostep: DeepSpeed's training engine as pure functions over an explicit state pytree.

The machinery lives in four subpackages mapped from the repository's top-level folders:
``zerostep.core`` (config, state, step, engine, CLI), ``zerostep.parallel`` (process groups,
flat-buffer sharding, collectives, ZeRO), ``zerostep.optim`` (optimizers, schedules, kernels) and
``zerostep.io`` (msgpack pytree codec, checkpoints).

This package root holds DeepSpeed's names, so that a DeepSpeed script runs after
``import deepspeed`` becomes ``import zerostep as deepspeed``: ``initialize`` (the imperative engine of
``zerostep.runtime``), ``init_distributed``, ``add_config_arguments``, and the subpackages ``comm``,
``accelerator``, ``zero``, ``ops``, ``runtime``. They translate DeepSpeed's calling conventions onto the
four subpackages and hold no machinery of their own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from zerostep.errors import ConfigError

__version__ = "0.1.0"


def initialize(
    args: Any = None,
    model: Any = None,
    optimizer: Any = None,
    model_parameters: Iterable | None = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int = 29500,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Callable | None = None,
    config: dict | str | os.PathLike | None = None,
    mesh_param: Any = None,
    config_params: dict | str | None = None,
    *,
    compile: bool = True,
) -> tuple[Any, Any, Any, Any]:
    """DeepSpeed's ``deepspeed.initialize``: ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    ``engine`` is a ``zerostep.runtime.DeepSpeedEngine`` (``engine(x)``, ``backward``, ``step``,
    ``save_checkpoint``, ...) over ``zerostep.core``'s functional engine. ``compile`` (zerostep's own
    keyword) compiles the module's forward and the update with ``torch.compile``.
    """
    from zerostep.parallel import groups
    from zerostep.runtime.config_sources import resolve_config_sources
    from zerostep.runtime.initialize import build

    if model is None:
        raise ValueError("zerostep.initialize requires a model")
    if dist_init_required:
        from zerostep.comm import init_distributed

        init_distributed(distributed_port=distributed_port, dist_init_required=True)
    else:
        groups.maybe_init_distributed()
    config_dict = resolve_config_sources(args=args, config=config, config_params=config_params)
    if mesh_param is not None:  # DeepSpeed's (data, sequence) device mesh (core/sequence_parallel.py)
        from zerostep.core.sequence_parallel import mesh_param_config

        config_dict = mesh_param_config(config_dict, mesh_param, mpu)
    mesh = None
    if mpu is not None:  # its data-parallel group and size (zerostep/core/model_parallel.py)
        from zerostep.core.model_parallel import mesh_for

        mesh = mesh_for(None, mpu)
    engine, zero_optimizer, scheduler = build(
        model=model,
        config_dict=config_dict,
        optimizer=optimizer,
        model_parameters=model_parameters,
        lr_scheduler=lr_scheduler,
        world_size=mesh.dp_size if mesh is not None else None,  # None: the group's / autotp_size
        compile=compile,
        mesh=mesh,
    )
    loader = None
    if training_data is not None:
        loader = engine.deepspeed_io(training_data, collate_fn=collate_fn)
    return engine, zero_optimizer, loader, scheduler


def init_distributed(*args: Any, **kwargs: Any) -> None:
    """DeepSpeed's ``deepspeed.init_distributed`` (``zerostep.comm.init_distributed``)."""
    from zerostep.comm import init_distributed as init

    init(*args, **kwargs)


def add_config_arguments(parser: Any) -> Any:
    """DeepSpeed's ``--deepspeed`` / ``--deepspeed_config`` arguments (``zerostep.arguments``)."""
    from zerostep.arguments import add_config_arguments as add

    return add(parser)


def init_inference(model: Any, config: dict | str | os.PathLike | None = None, **kwargs: Any) -> Any:
    """DeepSpeed's ``deepspeed.init_inference``: an ``InferenceEngine`` (``zerostep.inference``)."""
    from zerostep.inference import init_inference as init

    return init(model, config, **kwargs)


_SUBPACKAGES = ("accelerator", "checkpointing", "comm", "elasticity", "moe", "ops", "pipe", "runtime", "zero")


def __getattr__(name: str) -> Any:
    # ``import zerostep as deepspeed; deepspeed.comm.get_rank()``: DeepSpeed's subpackages on first use
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"zerostep.{name}")
    raise AttributeError(f"module 'zerostep' has no attribute {name!r}")


__all__ = ["ConfigError", "__version__", "add_config_arguments", "init_distributed", "initialize"]
__all__ += ["init_inference"]
