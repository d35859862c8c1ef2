"""zerostep.accelerator: DeepSpeed's ``deepspeed.accelerator`` (``get_accelerator()``) for CUDA and CPU.

    from zerostep.accelerator import get_accelerator    # DeepSpeed: from deepspeed.accelerator import ...
    device = torch.device(get_accelerator().device_name(), local_rank)
    get_accelerator().set_device(local_rank); get_accelerator().manual_seed_all(seed)

- ``abstract``: ``DeepSpeedAccelerator``, the interface, and what the devices share.
- ``cuda`` / ``cpu``: ``CUDA_Accelerator`` (``torch.cuda``) and ``CPU_Accelerator`` (host, gloo).
- ``real_accelerator``: ``get_accelerator`` / ``set_accelerator`` (``$DS_ACCELERATOR`` overrides).
- ``host_memory``: the CPU accelerator's memory figures from ``/proc``.
"""

from zerostep.accelerator.abstract import DeepSpeedAccelerator
from zerostep.accelerator.cpu import CPU_Accelerator
from zerostep.accelerator.cuda import CUDA_Accelerator
from zerostep.accelerator.real_accelerator import (
    SUPPORTED_ACCELERATOR_LIST,
    get_accelerator,
    is_current_accelerator_supported,
    set_accelerator,
)

__all__ = [
    "SUPPORTED_ACCELERATOR_LIST",
    "CPU_Accelerator",
    "CUDA_Accelerator",
    "DeepSpeedAccelerator",
    "get_accelerator",
    "is_current_accelerator_supported",
    "set_accelerator",
]
