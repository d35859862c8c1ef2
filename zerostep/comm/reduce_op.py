"""DeepSpeed's ``ReduceOp`` (an ``Enum`` of its own) and its translation to ``torch.distributed.ReduceOp``.

Scripts written for DeepSpeed pass either ``deepspeed.comm.ReduceOp.SUM`` or torch's own
``torch.distributed.ReduceOp.SUM``; both are accepted wherever an ``op`` is.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch.distributed as dist


class ReduceOp(Enum):
    """The members and values of ``deepspeed.comm.ReduceOp`` (``UNUSED`` has no torch counterpart)."""

    SUM = 0
    PRODUCT = 1
    MIN = 2
    MAX = 3
    BAND = 4
    BOR = 5
    BXOR = 6
    AVG = 7
    UNUSED = 8


def torch_reduce_op(op: Any) -> Any:
    """``op`` as a ``torch.distributed.ReduceOp``: torch's ops pass through, DeepSpeed's are translated."""
    if isinstance(op, ReduceOp):
        if op is ReduceOp.UNUSED:
            raise ValueError(
                "ReduceOp.UNUSED is a placeholder, not a reduction; pass SUM, AVG, MIN, MAX, ..."
            )
        return getattr(dist.ReduceOp, op.name)
    if isinstance(op, dist.ReduceOp):  # RedOpType members are instances too
        return op
    raise TypeError(
        f"op={op!r} is not a reduction: pass zerostep.comm.ReduceOp.<NAME> or "
        "torch.distributed.ReduceOp.<NAME>"
    )
