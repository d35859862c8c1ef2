"""DeepSpeed's progress line and the rank-0 logger the monitoring lines go through.

DeepSpeed logs ``step=N, skipped=K, lr=[...], mom=[...]`` on rank 0 every ``steps_per_print`` optimizer
steps through its own logger, which prints at INFO by default; zerostep's ``zerostep.monitoring`` logger
does the same (a stderr handler is added only when neither it nor the root logger has one, so an
application's logging configuration wins).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

LOGGER_NAME = "zerostep.monitoring"
logger = logging.getLogger(LOGGER_NAME)


def _ensure_handler() -> None:
    if logger.handlers or logging.getLogger().handlers:
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[zerostep] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def log_rank0(message: str, rank: int) -> None:
    """Log ``message`` at INFO on rank 0 only (DeepSpeed's ``log_dist(..., ranks=[0])``)."""
    if rank != 0:
        return
    _ensure_handler()
    logger.info(message)


def progress_line(step: int, skipped: int, lrs: list[float], moms: list[Any]) -> str:
    """DeepSpeed's ``_report_progress`` text: lists of the param groups' lr and momentum/betas."""
    return f"step={step}, skipped={skipped}, lr={list(lrs)}, mom={list(moms)}"
