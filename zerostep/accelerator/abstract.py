"""``DeepSpeedAccelerator``: the interface of ``deepspeed.accelerator``'s objects, and what devices share.

Scripts call it to stay device-neutral (``get_accelerator().device_name()``, ``.set_device(local_rank)``,
``.is_bf16_supported()``...). zerostep provides the two devices it runs on, ``cuda`` and ``cpu``
(``cuda.py``, ``cpu.py``); a subclass for another device can be installed with ``set_accelerator``.
zerostep builds no DeepSpeed C++/CUDA ops, so the op-builder queries answer ``None`` (not available).
"""

from __future__ import annotations

import abc
import functools
import os
from collections.abc import Callable
from typing import Any

import torch


class DeepSpeedAccelerator(abc.ABC):
    """One device kind. ``_name`` is DeepSpeed's device name ('cuda', 'cpu')."""

    supports_nvtx_domain = False

    def __init__(self, name: str, communication_backend: str):
        self._name = name
        self._communication_backend_name = communication_backend
        self._compile_backend = "inductor"

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r})"

    # -- what the device guarantees (DeepSpeed: a synchronized device needs no device timers/events)
    @abc.abstractmethod
    def is_synchronized_device(self) -> bool: ...

    def use_host_timers(self) -> bool:
        return self.is_synchronized_device()

    def resolves_data_dependency(self) -> bool:
        return self.is_synchronized_device()

    def handles_memory_backpressure(self) -> bool:
        return self.is_synchronized_device()

    # -- devices
    def device_name(self, device_index: int | None = None) -> str:
        return self._name if device_index is None else f"{self._name}:{device_index}"

    def device(self, device_index: int | None = None) -> torch.device:
        return torch.device(self._name, device_index)

    @abc.abstractmethod
    def set_device(self, device_index: int) -> None: ...

    @abc.abstractmethod
    def current_device(self) -> int: ...

    def current_device_name(self) -> str:
        return f"{self._name}:{self.current_device()}"

    @abc.abstractmethod
    def device_count(self) -> int: ...

    @abc.abstractmethod
    def synchronize(self, device_index: int | None = None) -> None: ...

    @abc.abstractmethod
    def is_available(self) -> bool: ...

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == self._name

    # -- random numbers
    def random(self) -> Any:
        return torch.random

    # -- data types
    @abc.abstractmethod
    def is_bf16_supported(self) -> bool: ...

    @abc.abstractmethod
    def is_fp16_supported(self) -> bool: ...

    def supported_dtypes(self) -> list[torch.dtype]:
        dtypes = [torch.float32]
        if self.is_fp16_supported():
            dtypes.append(torch.float16)
        if self.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        return dtypes

    # -- communication and compilation
    def communication_backend_name(self) -> str:
        return self._communication_backend_name

    def get_compile_backend(self) -> str:
        return self._compile_backend

    def set_compile_backend(self, backend: str) -> None:
        supported = torch._dynamo.list_backends(exclude_tags=())
        if backend not in supported:
            raise ValueError(
                f"{backend} not supported by {self.device_name()}. Supported backends: {supported}"
            )
        self._compile_backend = backend

    # -- memory: pinning (host memory the device can copy from asynchronously)
    def pin_memory(
        self, tensor: torch.Tensor, make_copy: bool = True, match_shape: bool = True
    ) -> torch.Tensor:
        return tensor.pin_memory()

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()

    def unpin_memory(self, tensor: torch.Tensor) -> None:
        return None  # torch frees pinned memory with the tensor

    # -- tensor constructors: ``FloatTensor([1, 2])`` is ``torch.tensor([1, 2], dtype=float32)`` on this
    # device (DeepSpeed's CUDA meaning; its CPU accelerator returns torch's legacy constructors instead)
    def _constructor(self, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
        return functools.partial(torch.tensor, dtype=dtype, device=self._name)

    @property
    def BFloat16Tensor(self) -> Callable[..., torch.Tensor]:  # DeepSpeed's name
        return self._constructor(torch.bfloat16)

    @property
    def ByteTensor(self) -> Callable[..., torch.Tensor]:
        return self._constructor(torch.uint8)

    @property
    def DoubleTensor(self) -> Callable[..., torch.Tensor]:
        return self._constructor(torch.float64)

    @property
    def FloatTensor(self) -> Callable[..., torch.Tensor]:
        return self._constructor(torch.float32)

    @property
    def HalfTensor(self) -> Callable[..., torch.Tensor]:
        return self._constructor(torch.float16)

    @property
    def IntTensor(self) -> Callable[..., torch.Tensor]:
        return self._constructor(torch.int32)

    @property
    def LongTensor(self) -> Callable[..., torch.Tensor]:
        return self._constructor(torch.int64)

    # -- DeepSpeed's C++/CUDA op builders: zerostep builds none
    def op_builder_dir(self) -> str | None:
        return None

    def create_op_builder(self, class_name: str) -> None:
        return None

    def get_op_builder(self, class_name: str) -> None:
        return None

    def is_triton_supported(self) -> bool:
        return False

    # -- launcher support
    def export_envs(self) -> list[str]:
        return []

    def visible_devices_envs(self) -> list[str]:
        return ["CUDA_VISIBLE_DEVICES"]

    def set_visible_devices_envs(self, current_env: dict[str, str], local_accelerator_ids: list[int]) -> None:
        for name in self.visible_devices_envs():
            current_env[name] = ",".join(map(str, local_accelerator_ids))


def local_rank_from_env() -> int:
    raw = os.environ.get("LOCAL_RANK", "0") or "0"
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable LOCAL_RANK={raw!r} is not an integer") from None
