"""zerostep.comm: DeepSpeed's ``deepspeed.comm`` names over ``torch.distributed``.

    from zerostep import comm as dist          # in a DeepSpeed script: from deepspeed import comm as dist
    dist.init_distributed()
    dist.all_reduce(t, op=dist.ReduceOp.SUM); dist.get_rank(); dist.barrier()

- ``init``: ``init_distributed`` (torchrun or MPI environment, or one process), ``default_pg_timeout``.
- ``comm``: the collectives, point-to-point calls and group queries, thin wrappers over torch's.
- ``reduce_op``: DeepSpeed's ``ReduceOp`` enum (torch's ops are accepted too).
- ``launcher_env``: ranks from the launcher's variables (``get_local_rank_from_launcher``, ...).
- ``comms_logging``: DeepSpeed's comms logger (``configure``, ``log_summary``): count, message sizes,
  latency and bandwidths of the collectives this process issues (``core/monitoring/comms_logger.py``).
"""

from zerostep.comm.comm import (
    all_gather,
    all_gather_coalesced,
    all_gather_into_tensor,
    all_gather_object,
    all_reduce,
    all_reduce_coalesced,
    all_to_all,
    all_to_all_single,
    allgather_fn,
    barrier,
    broadcast,
    broadcast_object_list,
    destroy_process_group,
    gather,
    get_all_ranks_from_group,
    get_backend,
    get_global_rank,
    get_local_rank,
    get_rank,
    get_world_group,
    get_world_size,
    has_all_gather_into_tensor,
    has_all_reduce_coalesced,
    has_coalescing_manager,
    has_reduce_scatter_tensor,
    inference_all_reduce,
    irecv,
    is_available,
    is_initialized,
    isend,
    monitored_barrier,
    new_group,
    recv,
    reduce,
    reduce_scatter,
    reduce_scatter_fn,
    reduce_scatter_tensor,
    scatter,
    send,
)
from zerostep.comm.comms_logging import (
    configure,
    get_comm_operation_count,
    get_logged_comm_ops,
    has_comm_data,
    log_summary,
    reset_log,
)
from zerostep.comm.init import default_pg_timeout, init_distributed
from zerostep.comm.launcher_env import (
    get_local_rank_from_launcher,
    get_world_rank_from_launcher,
    get_world_size_from_launcher,
)
from zerostep.comm.reduce_op import ReduceOp

__all__ = [
    "ReduceOp",
    "all_gather",
    "all_gather_coalesced",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_reduce_coalesced",
    "all_to_all",
    "all_to_all_single",
    "allgather_fn",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "configure",
    "default_pg_timeout",
    "destroy_process_group",
    "gather",
    "get_all_ranks_from_group",
    "get_backend",
    "get_comm_operation_count",
    "get_global_rank",
    "get_local_rank",
    "get_local_rank_from_launcher",
    "get_logged_comm_ops",
    "get_rank",
    "get_world_group",
    "get_world_rank_from_launcher",
    "get_world_size",
    "get_world_size_from_launcher",
    "has_all_gather_into_tensor",
    "has_all_reduce_coalesced",
    "has_coalescing_manager",
    "has_comm_data",
    "has_reduce_scatter_tensor",
    "inference_all_reduce",
    "init_distributed",
    "irecv",
    "is_available",
    "is_initialized",
    "isend",
    "log_summary",
    "monitored_barrier",
    "new_group",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_fn",
    "reduce_scatter_tensor",
    "reset_log",
    "scatter",
    "send",
]
