"""Process groups over ``torch.distributed``: start-up from torchrun's environment and the data-parallel mesh.

``maybe_init_distributed()`` is the one place a process group is created: when torchrun (or
``spawn_ranks``) has set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` it initializes gloo on
CPU or NCCL on CUDA (binding the process to ``LOCAL_RANK``'s device, which must exist), with a timeout so
that a dead peer makes every collective fail instead of hanging. Without those variables the process runs
alone. ``check_model_devices`` tells a model on the wrong GPU apart before anything runs on it.

``Mesh`` describes the default group as one data-parallel group; the engine's data-parallel x
model-parallel grid (AutoTP, an mpu) is ``parallel/mesh.py``'s ``ParallelMesh``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "ZEROSTEP_DIST_TIMEOUT"


def default_timeout_s() -> float:
    """Collective timeout in seconds: ``$ZEROSTEP_DIST_TIMEOUT`` when set, else 300."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError as e:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from e
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be > 0 seconds")
    return value


def backend_for_device() -> str:
    """NCCL when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def maybe_init_distributed(timeout_s: float | None = None) -> bool:
    """Initialize the default process group from torchrun's environment if it is not up yet.

    Returns whether a process group is active afterwards. Does nothing (and returns ``False``) when the
    torchrun variables are absent; an already initialized group (e.g. by ``spawn_ranks``) is kept as is.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if any(os.environ.get(k) in (None, "") for k in TORCHRUN_ENV):
        return False
    timeout = timeout_s if timeout_s is not None else default_timeout_s()
    backend = backend_for_device()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kwargs = {}
    if backend == "nccl":
        device = local_rank_device()
        torch.cuda.set_device(device)
        # Binding the group to this rank's device lets NCCL create its communicator eagerly.
        kwargs["device_id"] = device
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
        **kwargs,
    )
    return True


def local_rank() -> int | None:
    """``$LOCAL_RANK`` (torchrun's index of this process on its node), or None when unset."""
    raw = os.environ.get("LOCAL_RANK")
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError as e:
        raise ValueError(f"LOCAL_RANK={raw!r} is not an integer") from e
    if value < 0:
        raise ValueError(f"LOCAL_RANK={raw!r} must be >= 0")
    return value


def local_rank_device() -> torch.device:
    """This rank's GPU, ``cuda:LOCAL_RANK`` (0 when unset), checked against the GPUs this process sees:
    a clear error instead of one from deep inside ``set_device`` when more ranks run than GPUs."""
    index = local_rank() or 0
    visible = torch.cuda.device_count()
    if index >= visible:
        mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f" (CUDA_VISIBLE_DEVICES={mask!r})" if mask is not None else ""
        raise ValueError(
            f"LOCAL_RANK={index} but this process sees {visible} GPU(s){seen}: each rank needs its own "
            f"GPU, so run at most {visible} rank(s) per node (torchrun --nproc-per-node={max(visible, 1)})"
        )
    return torch.device("cuda", index)


def check_model_devices(devices: dict[str, torch.device], backend: str | None) -> torch.device:
    """The one device ``devices`` (parameter name -> device) all sit on, checked against this rank's.

    Parameters on several devices are an error. Under NCCL they must be on a GPU, and on this rank's
    GPU: ``cuda:LOCAL_RANK`` when torchrun set ``LOCAL_RANK``, else the current device; otherwise
    every rank can end up computing on ``cuda:0`` unnoticed."""
    found: dict[torch.device, str] = {}
    for name, device in devices.items():
        found.setdefault(device, name)
    if len(found) > 1:
        listed = ", ".join(f"{d} ({n!r}, ...)" for d, n in found.items())
        raise ValueError(
            f"the model's trainable parameters sit on several devices: {listed}; move the "
            "model to one device before initialize()"
        )
    device = next(iter(found))
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"the process group uses NCCL but the model's parameters are on {device}; "
            "move the model to its GPU (cuda:LOCAL_RANK) before initialize()"
        )
    if device.type == "cuda" and backend == "nccl":
        index = local_rank()
        expected = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        if device != expected:
            why = f"LOCAL_RANK={index}" if index is not None else "torch.cuda.current_device()"
            raise ValueError(
                f"the model's parameters are on {device} but this rank's GPU is {expected} ({why}); "
                f"move the model there (model.to({str(expected)!r})) before initialize()"
            )
    return device


def block_layout(world_size: int, size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(consecutive blocks of ``size`` ranks, the strided groups across them) for ``world_size`` ranks:
    Megatron's and DeepSpeed's layout of tensor-, sequence- and expert-parallel groups (the blocks) and
    their data-parallel groups (rank ``i`` of every block). ``size`` must divide ``world_size``."""
    blocks = [list(range(start, start + size)) for start in range(0, world_size, size)]
    strided = [list(range(i, world_size, size)) for i in range(size)]
    return blocks, strided


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def dp_group() -> dist.ProcessGroup | None:
    """The data-parallel group: the default group when distributed is up, else ``None`` (one rank)."""
    return dist.group.WORLD if is_distributed() else None


def dp_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def dp_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def device_for_backend() -> torch.device:
    """The device tensors must live on for the active backend: this rank's CUDA device for NCCL, else CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if not is_distributed() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Mesh:
    """The parallel layout of this process: which group each kind of reduction runs over.

    Only data parallelism exists today. ``dp_group is None`` means a single rank (no collectives).
    Expert or pipeline groups would be added as fields next to ``dp_group``.
    """

    dp_group: dist.ProcessGroup | None
    dp_rank: int
    dp_world_size: int
    device: torch.device

    @staticmethod
    def current() -> Mesh:
        """The mesh of the default process group (or a one-rank mesh when distributed is not up)."""
        return Mesh(dp_group(), dp_rank(), dp_world_size(), device_for_backend())

    @staticmethod
    def single(device: torch.device | str = "cpu") -> Mesh:
        return Mesh(None, 0, 1, torch.device(device))

    @property
    def is_single(self) -> bool:
        return self.dp_world_size == 1
