"""``get_accelerator()`` / ``set_accelerator()``: the process's accelerator, chosen once.

As DeepSpeed 0.19: ``$DS_ACCELERATOR`` overrides the choice; otherwise CUDA when a GPU is visible, else
the CPU. zerostep knows ``cuda`` and ``cpu``; naming another device DeepSpeed supports (xpu, npu, mps,
hpu, ...) is an error that says so, rather than a silent CPU run.
"""

from __future__ import annotations

import os

import torch

from zerostep.accelerator.abstract import DeepSpeedAccelerator
from zerostep.accelerator.cpu import CPU_Accelerator
from zerostep.accelerator.cuda import CUDA_Accelerator

SUPPORTED_ACCELERATOR_LIST = ["cuda", "cpu"]
DEEPSPEED_ONLY = ["xpu", "npu", "mps", "hpu", "mlu", "sdaa", "supa"]

_accelerator: DeepSpeedAccelerator | None = None


def get_accelerator() -> DeepSpeedAccelerator:
    """The accelerator of this process (created on first use)."""
    global _accelerator
    if _accelerator is None:
        _accelerator = _from_environment()
    return _accelerator


def set_accelerator(accel_obj: DeepSpeedAccelerator | None) -> None:
    """Install ``accel_obj`` as the process's accelerator (``None``: choose again on next use)."""
    global _accelerator
    if accel_obj is not None and not isinstance(accel_obj, DeepSpeedAccelerator):
        raise TypeError(f"{type(accel_obj).__name__} accelerator is not a subclass of DeepSpeedAccelerator")
    _accelerator = accel_obj


def is_current_accelerator_supported() -> bool:
    return get_accelerator().device_name() in SUPPORTED_ACCELERATOR_LIST


def _from_environment() -> DeepSpeedAccelerator:
    name = os.environ.get("DS_ACCELERATOR")
    if name is not None:
        if name == "cuda":
            return CUDA_Accelerator()
        if name == "cpu":
            return CPU_Accelerator()
        if name in DEEPSPEED_ONLY:
            raise ValueError(f"DS_ACCELERATOR={name!r}: zerostep runs on {SUPPORTED_ACCELERATOR_LIST} only")
        raise ValueError(
            f"DS_ACCELERATOR must be one of {SUPPORTED_ACCELERATOR_LIST}; {name!r} is not supported"
        )
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return CUDA_Accelerator()
    return CPU_Accelerator()
