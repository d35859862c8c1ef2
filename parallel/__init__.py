"""zerostep.parallel: process groups, flat-buffer sharding plans, collectives, ZeRO-3 unit gathering.

- ``groups``: ``maybe_init_distributed`` from torchrun's environment, the data-parallel group, ``Mesh``.
- ``mesh``: ``ParallelMesh``, the data-parallel x model-parallel grid the engine trains over (the world,
  ``tensor_parallel_mesh(N)`` for AutoTP, or ``mesh_from_mpu(mpu)``).
- ``flat``: ``FlatLayout``, many named tensors packed in one buffer padded to shard evenly.
- ``collectives``: all-reduce / reduce-scatter / all-gather over flat buffers (functional collectives
  under ``torch.compile``), the same into preallocated outputs, sync or async (``Pending``), with
  faster algorithms on gloo; buckets, and static byte accounting.
- ``shm``: ``SharedMemoryChannel``, the same collectives through ``/dev/shm`` between gloo ranks on one
  host (``attach_shared_memory`` gives a group one; the engine does it).
- ``zero3``: ``plan_units`` (FSDP-style units) and ``Zero3Runner`` (gather, free, regather, reduce-scatter).
- ``launch``: ``spawn_ranks`` for real multi-rank runs on one machine (tests, benchmarks).
- ``moe_gate``, ``expert``, ``moe_layer``: Mixture of Experts (top-k gating; expert groups, all-to-all
  dispatch and combine; DeepSpeed's ``MoE`` layer, re-exported by ``zerostep.moe``).
"""

from zerostep.parallel.collectives import (
    CommCounter,
    CommPlan,
    Pending,
    all_gather_flat,
    all_gather_into,
    all_gather_rows,
    all_reduce_flat,
    all_reduce_into,
    attach_shared_memory,
    detach_shared_memory,
    reduce_scatter_flat,
    reduce_scatter_into,
    shared_memory_channel,
)
from zerostep.parallel.flat import FlatLayout
from zerostep.parallel.groups import Mesh, maybe_init_distributed
from zerostep.parallel.launch import RankFailure, spawn_ranks
from zerostep.parallel.shm import SharedMemoryChannel
from zerostep.parallel.zero3 import ROOT_UNIT, Unit, Zero3Runner, plan_units

__all__ = [
    "ROOT_UNIT",
    "CommCounter",
    "CommPlan",
    "FlatLayout",
    "Mesh",
    "Pending",
    "RankFailure",
    "SharedMemoryChannel",
    "Unit",
    "Zero3Runner",
    "all_gather_flat",
    "all_gather_into",
    "all_gather_rows",
    "all_reduce_flat",
    "all_reduce_into",
    "attach_shared_memory",
    "detach_shared_memory",
    "maybe_init_distributed",
    "plan_units",
    "reduce_scatter_flat",
    "reduce_scatter_into",
    "shared_memory_channel",
    "spawn_ranks",
]
