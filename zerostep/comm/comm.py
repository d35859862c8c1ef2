"""DeepSpeed's ``deepspeed.comm`` collectives and queries, as thin wrappers over ``torch.distributed``.

Signatures are DeepSpeed 0.19's, including the ``prof`` / ``log_name`` / ``debug`` keywords of its
logged operations (accepted; ``prof=True`` warns once that comms logging lives with the monitors).
``op`` may be DeepSpeed's ``ReduceOp`` or torch's. Each call returns what torch returns (a work handle
when ``async_op``), with three differences from DeepSpeed, each where DeepSpeed is wrong or fails:

- ``isend`` / ``irecv`` are non-blocking and return the work handle (DeepSpeed's run a blocking ``send``
  / ``recv`` and return ``None``);
- ``get_rank`` / ``get_world_size`` answer 0 / 1 for a process with no group (DeepSpeed asserts), as
  zerostep's functional engine runs alone without one; collectives without a group raise a
  ``RuntimeError`` that says to call ``init_distributed``;
- ``all_reduce_coalesced`` packs the tensors into one buffer and reduces that (torch's own is deprecated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from zerostep.comm import comms_logging
from zerostep.comm.launcher_env import get_local_rank_from_launcher
from zerostep.comm.reduce_op import ReduceOp, torch_reduce_op
from zerostep.parallel.collectives import c10d_all_gather, c10d_reduce_scatter

Group = Any  # a torch.distributed.ProcessGroup, or None for the default group


def _ready(what: str, prof: bool = False) -> None:
    if not dist.is_initialized():
        raise RuntimeError(
            f"zerostep.comm.{what}: torch.distributed is not initialized; call zerostep.init_distributed() "
            "(deepspeed.init_distributed()) first"
        )


# -- state of the process group -----------------------------------------------------------------------


def is_available() -> bool:
    return dist.is_available()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group: Group = None) -> int:
    """This process's rank in ``group`` (-1 if not a member); 0 when no process group exists."""
    if group is None and not is_initialized():
        return 0
    return dist.get_rank(group)


def get_world_size(group: Group = None) -> int:
    """The number of ranks in ``group``; 1 when no process group exists."""
    if group is None and not is_initialized():
        return 1
    return dist.get_world_size(group)


def get_local_rank() -> int:
    """This process's rank on its host (= its device index), from the launcher's environment."""
    return get_local_rank_from_launcher()


def get_global_rank(group: Group = None, group_rank: int = 0) -> int:
    """The global rank of ``group_rank`` in ``group``."""
    _ready("get_global_rank")
    return dist.get_global_rank(group if group is not None else dist.group.WORLD, group_rank)


def get_all_ranks_from_group(group: Group = None) -> list[int]:
    _ready("get_all_ranks_from_group")
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def get_world_group() -> Any:
    _ready("get_world_group")
    return dist.group.WORLD


def get_backend(group: Group = None) -> str:
    _ready("get_backend")
    return dist.get_backend(group)


def new_group(ranks: Sequence[int] | None = None, **kwargs: Any) -> Any:
    """A new process group over ``ranks`` (collective: every rank of the default group must call it)."""
    _ready("new_group")
    return dist.new_group(list(ranks) if ranks is not None else None, **kwargs)


def destroy_process_group(group: Group = None) -> None:
    dist.destroy_process_group(group)


# -- collectives --------------------------------------------------------------------------------------


@comms_logging.logged("tensor")
def all_reduce(
    tensor: torch.Tensor,
    op: Any = ReduceOp.SUM,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    log_name: str = "all_reduce",
    debug: Any = None,
) -> Any:
    _ready("all_reduce", prof)
    return dist.all_reduce(tensor, op=torch_reduce_op(op), group=group, async_op=async_op)


@comms_logging.logged("tensor")
def inference_all_reduce(
    tensor: torch.Tensor,
    op: Any = ReduceOp.SUM,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    log_name: str = "all_reduce",
    debug: Any = None,
) -> torch.Tensor:
    """A blocking all-reduce that returns ``tensor`` (reduced in place); the identity on one rank."""
    _ready("inference_all_reduce", prof)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=torch_reduce_op(op), group=group)
    return tensor


def all_reduce_coalesced(
    tensors: Sequence[torch.Tensor],
    op: Any = ReduceOp.SUM,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    log_name: str = "all_reduce",
    debug: Any = None,
) -> Any:
    """All-reduce several tensors of one dtype and device as one flat buffer."""
    _ready("all_reduce_coalesced", prof)
    tensors = list(tensors)
    if not tensors:
        return None
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        raise ValueError("all_reduce_coalesced: every tensor must have the same dtype and device")
    flat = torch.cat([t.reshape(-1) for t in tensors])

    def unpack() -> None:
        for t, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(piece.view_as(t))

    work = dist.all_reduce(flat, op=torch_reduce_op(op), group=group, async_op=async_op)
    if not async_op:
        unpack()
        return None
    return _ThenWork([work], unpack)


@comms_logging.logged("tensor")
def reduce(
    tensor: torch.Tensor,
    dst: int,
    op: Any = ReduceOp.SUM,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    log_name: str = "reduce",
    debug: Any = None,
) -> Any:
    _ready("reduce", prof)
    return dist.reduce(tensor, dst, op=torch_reduce_op(op), group=group, async_op=async_op)


@comms_logging.logged("tensor")
def broadcast(
    tensor: torch.Tensor,
    src: int,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    log_name: str = "broadcast",
    debug: Any = None,
) -> Any:
    _ready("broadcast", prof)
    return dist.broadcast(tensor, src, group=group, async_op=async_op)


def broadcast_object_list(object_list: list[Any], src: int, group: Group = None, device: Any = None) -> None:
    _ready("broadcast_object_list")
    dist.broadcast_object_list(object_list, src, group=group, device=device)


@comms_logging.logged("tensor")
def all_gather(
    tensor_list: list[torch.Tensor],
    tensor: torch.Tensor,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    log_name: str = "all_gather",
    debug: Any = None,
) -> Any:
    _ready("all_gather", prof)
    return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)


def all_gather_object(
    object_list: list[Any],
    obj: Any,
    group: Group = None,
    prof: bool = False,
    log_name: str = "all_gather_object",
    debug: Any = None,
) -> None:
    _ready("all_gather_object", prof)
    dist.all_gather_object(object_list, obj, group=group)


@comms_logging.logged("tensor")
def all_gather_into_tensor(
    output_tensor: torch.Tensor,
    tensor: torch.Tensor,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    log_name: str = "all_gather_into_tensor",
    debug: Any = None,
) -> Any:
    """``output_tensor`` [N * n] = every rank's ``tensor`` [n], in rank order."""
    _ready("all_gather_into_tensor", prof)
    return c10d_all_gather(output_tensor, tensor, group=group, async_op=async_op)


def allgather_fn(
    output_tensor: torch.Tensor,
    input_tensor: torch.Tensor,
    group: Group = None,
    async_op: bool = False,
    debug: Any = None,
) -> Any:
    return all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)


def all_gather_coalesced(
    output_tensors: Sequence[torch.Tensor],
    input_tensors: Sequence[torch.Tensor],
    group: Group = None,
    async_op: bool = False,
) -> Any:
    """``all_gather_into_tensor`` for each (output, input) pair; one handle that waits for all of them."""
    _ready("all_gather_coalesced")
    if len(output_tensors) != len(input_tensors):
        raise ValueError(
            f"all_gather_coalesced: {len(output_tensors)} outputs for {len(input_tensors)} inputs"
        )
    works = [
        c10d_all_gather(out, inp, group=group, async_op=True)
        for out, inp in zip(output_tensors, input_tensors)
    ]
    handle = _ThenWork(works, None)
    if async_op:
        return handle
    handle.wait()
    return None


@comms_logging.logged("output_tensor")
def reduce_scatter_tensor(
    output_tensor: torch.Tensor,
    tensor: torch.Tensor,
    op: Any = ReduceOp.SUM,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    log_name: str = "reduce_scatter_tensor",
    debug: Any = None,
) -> Any:
    """``output_tensor`` [n] = this rank's slice of the reduction of every rank's ``tensor`` [N * n]."""
    _ready("reduce_scatter_tensor", prof)
    return c10d_reduce_scatter(output_tensor, tensor, op=torch_reduce_op(op), group=group, async_op=async_op)


def reduce_scatter_fn(
    output_tensor: torch.Tensor,
    tensor: torch.Tensor,
    op: Any = ReduceOp.SUM,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    debug: Any = None,
) -> Any:
    return reduce_scatter_tensor(output_tensor, tensor, op=op, group=group, async_op=async_op, prof=prof)


@comms_logging.logged("output")
def reduce_scatter(
    output: torch.Tensor,
    input_list: list[torch.Tensor],
    op: Any = ReduceOp.SUM,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    log_name: str = "reduce_scatter",
    debug: Any = None,
) -> Any:
    _ready("reduce_scatter", prof)
    return dist.reduce_scatter(output, input_list, op=torch_reduce_op(op), group=group, async_op=async_op)


@comms_logging.logged("tensor")
def all_to_all_single(
    output: torch.Tensor,
    tensor: torch.Tensor,
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    log_name: str = "all_to_all_single",
    debug: Any = None,
) -> Any:
    _ready("all_to_all_single", prof)
    return dist.all_to_all_single(
        output,
        tensor,
        output_split_sizes=output_split_sizes,
        input_split_sizes=input_split_sizes,
        group=group,
        async_op=async_op,
    )


@comms_logging.logged("input_tensor_list")
def all_to_all(
    output_tensor_list: list[torch.Tensor],
    input_tensor_list: list[torch.Tensor],
    group: Group = None,
    async_op: bool = False,
) -> Any:
    _ready("all_to_all")
    return dist.all_to_all(output_tensor_list, input_tensor_list, group=group, async_op=async_op)


@comms_logging.logged("tensor")
def gather(
    tensor: torch.Tensor,
    gather_list: list[torch.Tensor] | None = None,
    dst: int = 0,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    log_name: str = "gather",
    debug: Any = None,
) -> Any:
    _ready("gather", prof)
    return dist.gather(tensor, gather_list=gather_list, dst=dst, group=group, async_op=async_op)


@comms_logging.logged("tensor")
def scatter(
    tensor: torch.Tensor,
    scatter_list: list[torch.Tensor] | None = None,
    src: int = 0,
    group: Group = None,
    async_op: bool = False,
    prof: bool = False,
    log_name: str = "scatter",
    debug: Any = None,
) -> Any:
    _ready("scatter", prof)
    return dist.scatter(tensor, scatter_list=scatter_list, src=src, group=group, async_op=async_op)


@comms_logging.logged("tensor")
def send(
    tensor: torch.Tensor,
    dst: int,
    group: Group = None,
    tag: int = 0,
    prof: bool = False,
    log_name: str = "send",
    debug: Any = None,
) -> None:
    _ready("send", prof)
    dist.send(tensor, dst, group=group, tag=tag)


@comms_logging.logged("tensor")
def recv(
    tensor: torch.Tensor,
    src: int | None = None,
    group: Group = None,
    tag: int = 0,
    prof: bool = False,
    log_name: str = "recv",
    debug: Any = None,
) -> int:
    """Receive into ``tensor``; returns the sender's rank (any sender when ``src`` is None)."""
    _ready("recv", prof)
    return dist.recv(tensor, src=src, group=group, tag=tag)


@comms_logging.logged("tensor")
def isend(
    tensor: torch.Tensor,
    dst: int,
    group: Group = None,
    tag: int = 0,
    prof: bool = False,
    log_name: str = "isend",
    debug: Any = None,
) -> Any:
    _ready("isend", prof)
    return dist.isend(tensor, dst, group=group, tag=tag)


@comms_logging.logged("tensor")
def irecv(
    tensor: torch.Tensor,
    src: int | None = None,
    group: Group = None,
    tag: int = 0,
    prof: bool = False,
    log_name: str = "irecv",
    debug: Any = None,
) -> Any:
    _ready("irecv", prof)
    return dist.irecv(tensor, src=src, group=group, tag=tag)


@comms_logging.logged(None)
def barrier(
    group: Group = None,
    async_op: bool = False,
    device_ids: list[int] | None = None,
    prof: bool = False,
    log_name: str = "barrier",
    debug: Any = None,
) -> Any:
    _ready("barrier", prof)
    return dist.barrier(group=group, async_op=async_op, device_ids=device_ids)


def monitored_barrier(
    group: Group = None,
    timeout: Any = None,
    wait_all_ranks: bool = False,
    prof: bool = False,
    log_name: str = "monitored_barrier",
    debug: Any = None,
) -> None:
    """A barrier that names the ranks that did not arrive within ``timeout`` (gloo only, as in torch)."""
    _ready("monitored_barrier", prof)
    dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=wait_all_ranks)


# DeepSpeed's capability probes: every one of these exists here.
def has_all_reduce_coalesced() -> bool:
    return True


def has_coalescing_manager() -> bool:
    return False  # all_gather_coalesced issues its collectives one by one, not under torch's manager


def has_all_gather_into_tensor() -> bool:
    return True


def has_reduce_scatter_tensor() -> bool:
    return True


class _ThenWork:
    """A work handle over several handles that runs ``then`` once, after they all finish."""

    def __init__(self, works: list[Any], then: Callable[[], None] | None):
        self._works, self._then, self._done = works, then, False

    def wait(self, timeout: Any = None) -> bool:
        for work in self._works:
            work.wait() if timeout is None else work.wait(timeout)
        if not self._done:
            self._done = True
            if self._then is not None:
                self._then()
        return True

    def is_completed(self) -> bool:
        if not self._done and all(work.is_completed() for work in self._works):
            self.wait()  # finished: run ``then`` now, so a caller that only polls sees the final tensors
        return self._done
