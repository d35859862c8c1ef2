"""DeepSpeed's comms logger switches and summary (``deepspeed.comm.configure`` / ``log_summary``) over
``core/monitoring/comms_logger.py``'s process logger.

``configure(deepspeed_config=..., enabled=..., ...)`` turns recording on or off; while it records, the
engine's collectives (``parallel/collectives.py``) and ``zerostep.comm``'s (``logged`` below) are timed
to completion and their message bytes kept; ``log_summary()`` prints DeepSpeed's table on rank 0.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from zerostep.core.monitoring.comms_logger import COMMS_LOGGER, CommsLogger
from zerostep.parallel import collectives

_warned: set[str] = set()


def warn_once(what: str) -> None:
    """Warn, once per process and ``what``."""
    if what in _warned:
        return
    _warned.add(what)
    warnings.warn(what, stacklevel=3)


def _block(config: Any) -> Any:
    if config is None:
        return None
    if hasattr(config, "comms_logger") and not isinstance(config, Mapping):
        return config.comms_logger  # zerostep's Config (or a DeepSpeed config object)
    if isinstance(config, Mapping):
        return config.get("comms_logger")
    return getattr(getattr(config, "comms_config", None), "comms_logger", None)


def _get(block: Any, key: str) -> Any:
    return block.get(key) if isinstance(block, Mapping) else getattr(block, key, None)


def configure(
    deepspeed_config: Any = None,
    enabled: bool | None = None,
    prof_all: bool | None = None,
    prof_ops: list[str] | None = None,
    verbose: bool | None = None,
    debug: bool | None = None,
) -> None:
    """DeepSpeed's ``deepspeed.comm.configure``: the config's ``comms_logger`` block first, then the
    keywords given (None leaves a setting as it is)."""
    block = _block(deepspeed_config)
    if block is not None:
        COMMS_LOGGER.configure(
            *(_get(block, k) for k in ("enabled", "prof_all", "prof_ops", "verbose", "debug"))
        )
    COMMS_LOGGER.configure(enabled, prof_all, prof_ops, verbose, debug)
    collectives.comms_log = COMMS_LOGGER if COMMS_LOGGER.enabled else None


def logger() -> CommsLogger:
    return COMMS_LOGGER


def log_summary(show_straggler: bool = False, return_dict: bool = False) -> dict[str, Any] | None:
    """Rank 0 prints DeepSpeed's table of this rank's records; with ``return_dict`` every rank gets
    ``{"summary": ..., "straggler_analysis": None, "metadata": ...}``. ``show_straggler`` (a cross-rank
    comparison) is not implemented: it warns and the analysis is None."""
    import torch.distributed as dist

    if show_straggler:
        warn_once("log_summary(show_straggler=True): the straggler analysis is not implemented; none shown")
    initialized = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if initialized else 0
    if rank == 0:
        print(COMMS_LOGGER.summary_text(), flush=True)
    if not return_dict:
        return None
    world = dist.get_world_size() if initialized else 1
    return {
        "summary": COMMS_LOGGER.summary(),
        "straggler_analysis": None,
        "metadata": {"world_size": world, "rank": rank},
    }


def reset_log() -> None:
    COMMS_LOGGER.reset()


def has_comm_data() -> bool:
    return bool(COMMS_LOGGER.records)


def get_comm_operation_count() -> int:
    return COMMS_LOGGER.total_operations()


def get_logged_comm_ops() -> list[str]:
    return list(COMMS_LOGGER.records)


def logged(tensor_arg: str | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Record a ``zerostep.comm`` collective while the logger is on: its ``log_name`` (the function's
    name by default), the bytes of its argument ``tensor_arg`` (a list of tensors: their sum; None: 0),
    its group and time to completion. ``prof=True`` records it even when ``prof_all`` is off."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            log = collectives.comms_log
            if log is None:
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments
            kind = given.get("log_name", fn.__name__)
            if not (given.get("prof") or log.wants(kind)):
                return fn(*args, **kwargs)
            tensor = given.get(tensor_arg) if tensor_arg else None
            tensors = tensor if isinstance(tensor, (list, tuple)) else [] if tensor is None else [tensor]
            size = sum(t.numel() * t.element_size() for t in tensors)
            device = tensors[0].device if tensors else None
            was = log.prof_all
            log.prof_all = True  # prof=True: this call is recorded whatever prof_all says
            try:
                return log.time(kind, size, given.get("group"), lambda: fn(*args, **kwargs), device)
            finally:
                log.prof_all = was

        return call

    return wrap
