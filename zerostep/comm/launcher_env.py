"""Where this process's rank comes from: torchrun's variables, an MPI launcher's, or nowhere (one process).

DeepSpeed's ``init_distributed`` reads torchrun's ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``
(and ``LOCAL_RANK``); without them it asks ``mpi4py`` for the rank and size. zerostep reads the variables
that MPI launchers already export instead (Open MPI, MPICH / Intel MPI, MVAPICH2), so ``mpirun -np 4
python train.py`` works without ``mpi4py``; only a multi-node MPI launch with no ``MASTER_ADDR`` needs
``mpi4py`` (to learn rank 0's address, as DeepSpeed does). With no launcher at all the process runs alone.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from zerostep.parallel.groups import TORCHRUN_ENV

DEFAULT_PORT = 29500  # DeepSpeed's TORCH_DISTRIBUTED_DEFAULT_PORT

# (launcher, rank, world size, local rank, local world size) variables.
MPI_FLAVOURS = (
    (
        "Open MPI",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    ("MPICH / Intel MPI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    (
        "MVAPICH2",
        "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_SIZE",
    ),
)
SINGLE = "single process"
TORCHRUN = "torchrun"


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, and the rendezvous address (``None`` for a single process)."""

    source: str  # TORCHRUN, one of MPI_FLAVOURS' names, or SINGLE
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None

    def export(self) -> None:
        """Write the torchrun variables, as DeepSpeed's MPI discovery does, so later code (and
        ``torch.distributed``'s ``env://``) sees one consistent set."""
        os.environ.update(
            RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank)
        )
        if self.master_addr is not None:
            os.environ.update(MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def _int_var(name: str, minimum: int = 0) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw!r} must be >= {minimum}")
    return value


def _first_int(*names: str) -> int | None:
    for name in names:
        value = _int_var(name)
        if value is not None:
            return value
    return None


def get_local_rank_from_launcher() -> int:
    """``LOCAL_RANK``, else an MPI launcher's local rank, else 0 (DeepSpeed: LOCAL_RANK, then Open MPI's)."""
    value = _first_int("LOCAL_RANK", *(flavour[3] for flavour in MPI_FLAVOURS))
    return 0 if value is None else value


def get_world_rank_from_launcher() -> int:
    """``RANK``, else an MPI launcher's rank, else 0."""
    value = _first_int("RANK", *(flavour[1] for flavour in MPI_FLAVOURS))
    return 0 if value is None else value


def get_world_size_from_launcher() -> int:
    """``WORLD_SIZE``, else an MPI launcher's size, else 1."""
    found = [_int_var(name, minimum=1) for name in ("WORLD_SIZE", *(flavour[2] for flavour in MPI_FLAVOURS))]
    return next((value for value in found if value is not None), 1)


def discover(distributed_port: int = DEFAULT_PORT, auto_mpi_discovery: bool = True) -> LaunchEnv:
    """Read the launcher's variables. Raises ``RuntimeError`` when they describe a job of several
    processes but not how to reach rank 0."""
    present = [name for name in TORCHRUN_ENV if os.environ.get(name, "") != ""]
    if len(present) == len(TORCHRUN_ENV):
        rank, world_size = _int_var("RANK"), _int_var("WORLD_SIZE", minimum=1)
        if rank >= world_size:
            raise ValueError(f"RANK={rank} must be < WORLD_SIZE={world_size}")
        return LaunchEnv(
            TORCHRUN,
            rank,
            world_size,
            get_local_rank_from_launcher(),
            os.environ["MASTER_ADDR"],
            _int_var("MASTER_PORT", minimum=1),
        )
    if auto_mpi_discovery:
        for flavour in MPI_FLAVOURS:
            if _int_var(flavour[1]) is not None and _int_var(flavour[2], minimum=1) is not None:
                return _from_mpi(flavour, distributed_port)
    # RANK=0 / WORLD_SIZE=1 alone (some tools export them) still describe one process.
    if (_int_var("WORLD_SIZE", minimum=1) or 1) > 1 or (_int_var("RANK") or 0) > 0:
        missing = [name for name in TORCHRUN_ENV if name not in present]
        raise RuntimeError(
            f"the environment describes a job of several processes ({', '.join(present)} set) but {missing} "
            "are missing: launch with torchrun (or deepspeed / mpirun), or set all of "
            f"{list(TORCHRUN_ENV)}"
        )
    return LaunchEnv(SINGLE, 0, 1, get_local_rank_from_launcher())


def _from_mpi(flavour: tuple[str, str, str, str, str], distributed_port: int) -> LaunchEnv:
    name, rank_var, size_var, local_rank_var, local_size_var = flavour
    rank, world_size = _int_var(rank_var), _int_var(size_var, minimum=1)
    if rank >= world_size:
        raise ValueError(f"{rank_var}={rank} must be < {size_var}={world_size}")
    local_rank = _int_var(local_rank_var)
    local_size = _int_var(local_size_var, minimum=1)
    port = _int_var("MASTER_PORT", minimum=1) or distributed_port
    addr = os.environ.get("MASTER_ADDR") or None
    if addr is None and world_size == 1:
        addr = "127.0.0.1"
    if addr is None and local_size == world_size:
        addr = "127.0.0.1"  # every rank on this host
    if addr is None:
        addr, local_rank = _ask_mpi4py(name, rank, local_rank)
    if local_rank is None:
        local_rank = rank if local_size == world_size else 0
    return LaunchEnv(name, rank, world_size, local_rank, addr, port)


def _ask_mpi4py(launcher: str, rank: int, local_rank: int | None) -> tuple[str, int]:
    """Rank 0's address (and this rank's local rank) from MPI itself, as DeepSpeed's ``mpi_discovery``."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            f"{launcher} started this job across several hosts but MASTER_ADDR is not set: export "
            "MASTER_ADDR=<rank 0's host> (e.g. mpirun -x MASTER_ADDR=...), or install mpi4py so zerostep "
            "can ask MPI for it"
        ) from None
    comm = MPI.COMM_WORLD
    addr = comm.bcast(socket.gethostbyname(socket.gethostname()) if rank == 0 else None, root=0)
    if local_rank is None:  # ranks before this one on the same host
        hosts = comm.allgather(MPI.Get_processor_name())
        local_rank = sum(host == hosts[rank] for host in hosts[:rank])
    return addr, local_rank
