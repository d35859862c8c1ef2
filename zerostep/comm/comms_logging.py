"""DeepSpeed's communication-logger switches. zerostep does not log collectives here: counting and timing
communication belongs with the monitors (timers, TensorBoard/CSV/wandb), so each switch that would turn
logging on warns once that it has no effect, and ``log_summary`` reports that there is nothing to show."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

_warned: set[str] = set()

NO_COMMS_LOGGING = (
    "zerostep.comm does not log or time collectives (DeepSpeed's comms_logger); communication accounting "
    "lives with zerostep's monitors"
)


def warn_once(what: str) -> None:
    """Warn, once per process and ``what``, that a comms-logging request has no effect."""
    if what in _warned:
        return
    _warned.add(what)
    warnings.warn(f"{what}: no effect. {NO_COMMS_LOGGING}", stacklevel=3)


def configure(
    deepspeed_config: Any = None,
    enabled: bool | None = None,
    prof_all: bool | None = None,
    prof_ops: list[str] | None = None,
    verbose: bool | None = None,
    debug: bool | None = None,
) -> None:
    """DeepSpeed's ``deepspeed.comm.configure``: warns when asked to enable comms logging."""
    if _config_enables_logger(deepspeed_config):
        warn_once("comms_logger.enabled in the config")
    asked = {"enabled": enabled, "prof_all": prof_all, "verbose": verbose, "debug": debug}
    for name, value in asked.items():
        if value:
            warn_once(f"configure({name}=True)")
    if prof_ops:
        warn_once(f"configure(prof_ops={prof_ops!r})")


def _config_enables_logger(config: Any) -> bool:
    if config is None:
        return False
    block = (
        config.get("comms_logger") if isinstance(config, Mapping) else getattr(config, "comms_logger", None)
    )
    if block is None:
        block = getattr(config, "comms_config", None)  # a DeepSpeedConfig object
        block = getattr(block, "comms_logger", None)
    if isinstance(block, Mapping):
        return bool(block.get("enabled", False))
    return bool(getattr(block, "enabled", False))


def log_summary(show_straggler: bool = False, return_dict: bool = False) -> dict[str, Any] | None:
    """DeepSpeed prints per-operation message sizes and latencies here; zerostep records none (warns once)."""
    warn_once("log_summary()")
    return {} if return_dict else None


def reset_log() -> None:
    """Nothing is recorded, so nothing to reset."""


def has_comm_data() -> bool:
    return False


def get_comm_operation_count() -> int:
    return 0


def get_logged_comm_ops() -> list[str]:
    return []
