"""The CPU accelerator (``CPU_Accelerator``): DeepSpeed's CPU semantics over the host.

As DeepSpeed's: a synchronized device (no streams or events: ``Stream``/``Event`` are ``None`` and
``stream()`` is a no-op context), gloo for communication, memory figures from this process's resident
set (``host_memory``), one device per ``LOCAL_SIZE`` rank or per NUMA node. Differences: ``device()``
returns ``torch.device('cpu')`` (DeepSpeed's returns ``None``) and ``current_device()`` the integer
local rank (DeepSpeed's returns the ``LOCAL_RANK`` string when set).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

from zerostep.accelerator import host_memory
from zerostep.accelerator.abstract import DeepSpeedAccelerator, local_rank_from_env


class CPU_Accelerator(DeepSpeedAccelerator):  # DeepSpeed's name
    def __init__(self) -> None:
        super().__init__("cpu", "gloo")

    def is_synchronized_device(self) -> bool:
        return True

    # -- devices: one "device" per local rank; tensors all live on torch.device('cpu')
    def device_name(self, device_index: int | None = None) -> str:
        return "cpu"

    def device(self, device_index: int | None = None) -> torch.device:
        return torch.device("cpu")

    def set_device(self, device_index: int) -> None:
        return None

    def current_device(self) -> int:
        return local_rank_from_env()

    def current_device_name(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        raw = os.environ.get("LOCAL_SIZE", "")
        if raw.strip().isdigit() and int(raw) > 0:
            return int(raw)
        return host_memory.numa_nodes_with_cpus()

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def is_available(self) -> bool:
        return True

    # -- random numbers: the host generator
    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def initial_seed(self) -> int:
        return torch.initial_seed()

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, new_state: torch.Tensor, device_index: int | None = None) -> None:
        torch.set_rng_state(new_state)

    def default_generator(self, device_index: int) -> torch.Generator:
        return torch.default_generator

    # -- streams and events: none on a synchronized device
    @property
    def Stream(self) -> None:  # DeepSpeed's name
        return None

    @property
    def Event(self) -> None:
        return None

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def current_stream(self, device_index: int | None = None) -> None:
        return None

    def default_stream(self, device_index: int | None = None) -> None:
        return None

    # -- memory: the process's resident set
    def empty_cache(self) -> None:
        return None

    def memory_allocated(self, device_index: int | None = None) -> int:
        return host_memory.rss()

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        return host_memory.peak_rss()

    def reset_max_memory_allocated(self, device_index: int | None = None) -> None:
        host_memory.reset_peak()

    memory_cached = memory_reserved = memory_allocated
    max_memory_cached = max_memory_reserved = max_memory_allocated
    reset_max_memory_cached = reset_peak_memory_stats = reset_max_memory_allocated

    def memory_stats(self, device_index: int | None = None) -> dict[str, int]:
        return {
            "allocated_bytes.all.current": host_memory.rss(),
            "allocated_bytes.all.peak": host_memory.peak_rss(),
        }

    def total_memory(self, device_index: int | None = None) -> int:
        return host_memory.total()

    def available_memory(self, device_index: int | None = None) -> int:
        return host_memory.available()

    # -- data types
    def is_bf16_supported(self) -> bool:
        return True

    def is_fp16_supported(self) -> bool:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except (AttributeError, RuntimeError):
            return False

    def supported_dtypes(self) -> list[torch.dtype]:
        dtypes = [torch.float32, torch.bfloat16]  # DeepSpeed's CPU order
        if self.is_fp16_supported():
            dtypes.append(torch.float16)
        return dtypes

    # -- pinning means nothing without a device to copy to
    def pin_memory(
        self, tensor: torch.Tensor, make_copy: bool = True, match_shape: bool = True
    ) -> torch.Tensor:
        return tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return False

    # -- profiling ranges, lazy initialization, mixed precision
    def range_push(self, msg: str, domain: Any = None, category: Any = None) -> None:
        return None

    def range_pop(self, domain: Any = None) -> None:
        return None

    def lazy_call(self, callback: Callable[[], Any]) -> Any:
        return callback()

    def amp(self) -> Any:
        return torch.cpu.amp

    # -- no graphs on the host
    def create_graph(self) -> None:
        return None

    def capture_to_graph(
        self, graph: Any, pool: Any = None, stream: Any = None
    ) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def replay_graph(self, graph: Any) -> None:
        return None
