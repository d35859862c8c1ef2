"""``init_distributed``: DeepSpeed's entry point for the process group, over zerostep's start-up.

DeepSpeed 0.19 (``deepspeed/comm/comm.py``): a group that already exists is kept (whoever made it);
``dist_init_required=False`` demands one; otherwise the group is made from torchrun's variables, or from
MPI discovery, with the accelerator's backend (NCCL on CUDA, gloo on CPU) and ``timeout``
(``$DEEPSPEED_TIMEOUT`` minutes, 10 by default). zerostep differs where DeepSpeed fails:

- MPI launches are read from the launcher's variables, ``mpi4py`` only being needed to find rank 0's host
  on several nodes (``launcher_env``);
- with no launcher at all the process becomes a one-rank group (an in-process store, no port), so
  scripts that call ``torch.distributed.get_rank()`` or ``barrier()`` run unchanged as one process,
  where DeepSpeed needs mpi4py or a launcher;
- the default timeout is zerostep's (``$ZEROSTEP_DIST_TIMEOUT`` seconds, 300) unless
  ``$DEEPSPEED_TIMEOUT`` (minutes) is set, so a dead peer fails a collective in minutes either way.

The plain torchrun case goes through ``zerostep.parallel.groups.maybe_init_distributed``, the same path
``zerostep.core.initialize`` takes.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from zerostep.comm import comms_logging
from zerostep.comm.launcher_env import DEFAULT_PORT, SINGLE, discover
from zerostep.parallel import groups

logger = logging.getLogger("zerostep.comm")

DEEPSPEED_TIMEOUT_ENV = "DEEPSPEED_TIMEOUT"  # minutes, as DeepSpeed reads it


def default_pg_timeout() -> datetime.timedelta:
    """``$DEEPSPEED_TIMEOUT`` minutes when set, else zerostep's collective timeout."""
    raw = os.environ.get(DEEPSPEED_TIMEOUT_ENV)
    if raw is not None and raw.strip() != "":
        try:
            minutes = float(raw)
        except ValueError:
            raise ValueError(f"{DEEPSPEED_TIMEOUT_ENV}={raw!r} is not a number of minutes") from None
        if minutes <= 0:
            raise ValueError(f"{DEEPSPEED_TIMEOUT_ENV}={raw!r} must be > 0 minutes")
        return datetime.timedelta(minutes=minutes)
    return datetime.timedelta(seconds=groups.default_timeout_s())


def _as_timedelta(timeout: Any) -> datetime.timedelta:
    if timeout is None:
        return default_pg_timeout()
    if isinstance(timeout, datetime.timedelta):
        result = timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        result = datetime.timedelta(seconds=timeout)
    else:
        raise TypeError(f"timeout={timeout!r} must be a datetime.timedelta (or a number of seconds)")
    if result.total_seconds() <= 0:
        raise ValueError(f"timeout={timeout!r} must be positive")
    return result


def init_distributed(
    dist_backend: str | None = None,
    auto_mpi_discovery: bool = True,
    distributed_port: int = DEFAULT_PORT,
    verbose: bool = True,
    timeout: datetime.timedelta | float | None = None,
    init_method: str | None = None,
    dist_init_required: bool | None = None,
    config: Any = None,
    rank: int = -1,
    world_size: int = -1,
) -> None:
    """Make sure the default process group exists (DeepSpeed's ``deepspeed.init_distributed``).

    ``dist_backend``: None picks NCCL on CUDA, gloo otherwise. ``init_method`` / ``rank`` /
    ``world_size`` go to ``torch.distributed.init_process_group`` as given (e.g. ``tcp://host:port``);
    otherwise the launcher's environment decides. ``config``: a DeepSpeed config (dict or object) whose
    ``comms_logger`` block, if enabled, gets a warning that it has no effect. Idempotent.
    """
    comms_logging.configure(deepspeed_config=config)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch")
    if dist.is_initialized():
        if verbose and dist_init_required:
            logger.info("distributed backend already initialized")
        return
    if dist_init_required is False:
        raise RuntimeError(
            "Distributed backend is not initialized. Please set dist_init_required to True or initialize "
            "before calling deepspeed.initialize()"
        )
    pg_timeout = _as_timedelta(timeout)
    backend = dist_backend or groups.backend_for_device()
    if init_method is not None or rank >= 0 or world_size >= 0:
        _init(backend, pg_timeout, init_method=init_method, rank=rank, world_size=world_size)
        return
    launch = discover(distributed_port, auto_mpi_discovery)
    if launch.source == SINGLE:
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", str(launch.local_rank))):
            os.environ.setdefault(name, value)
        # Nobody else joins a one-rank group: an in-process store needs no port.
        _init(backend, pg_timeout, store=dist.HashStore(), rank=0, world_size=1)
    else:
        launch.export()
        if backend == groups.backend_for_device():
            groups.maybe_init_distributed(timeout_s=pg_timeout.total_seconds())
        else:
            _init(backend, pg_timeout, init_method="env://")
    if verbose:
        logger.info(
            "initialized torch.distributed: backend %s, rank %d of %d (%s)",
            dist.get_backend(),
            dist.get_rank(),
            dist.get_world_size(),
            launch.source,
        )


def _init(backend: str, timeout: datetime.timedelta, **kwargs: Any) -> None:
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, timeout=timeout, **kwargs)
