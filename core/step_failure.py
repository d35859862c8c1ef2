"""A step that fails on one rank fails on every rank, and never pairs one rank's step with another's.

Every collective of a step pairs with the same collective on the other ranks. A rank whose step raises
(a bad batch, a loss function that raises, an out-of-memory error) and whose caller catches the error
and goes on would otherwise issue its next step's collectives against the others' current ones: rank
0's step ``i`` paired with rank 1's step ``i + 1`` (at stage 3 the gradient norm reached 4e15). So the
ranks agree, at points every rank reaches, whether every rank's step is still fine:

- where the backward communicates (stage 2 shards gradients in backward, ``overlap_comm`` hooks on the
  communicating micro-batch, stage 3 throughout), a ``StepVote`` between that micro-batch's forward and
  its backward: one all-reduce of two numbers. A rank whose forward raised votes "failed" (at stage 3
  after issuing the parameter gathers the rest of its forward would have: ``Zero3Session.
  complete_forward``), and every rank raises before any backward collective;
- otherwise the backward is local and the first collective comes after it, so a rank that failed issues
  the reducer's collectives with zero gradients for the micro-batches it has left (their order is the
  layouts', the same on every rank) and sets a failure flag in graph A's all-reduce (the finite check
  and norm), which every rank reads before the update: no extra collective.

Either way nothing has been written when the ranks raise: the state passed in stays valid on every
rank, and the next ``engine.step`` on every rank starts aligned. The rank that failed raises its own
error; the others raise ``RemoteStepError`` naming it. Failures that cannot be agreed on (one raised in
a backward that was already communicating, or by a collective itself) leave the ranks in different
places of the step's sequence: the engine then refuses further steps (``RanksOutOfStepError``) rather
than pair them, and the other ranks fail in their collectives (at the group's timeout at the latest).

Limits: the zero-gradient placeholders and stage 3's completed gathers assume every rank runs the same
units in the same order (as FSDP and DeepSpeed's stage 3 do); at stage 3 that order is the previous
call's (module order before the first call).
"""

from __future__ import annotations

from typing import Any

import torch

from zerostep.parallel import collectives


class RemoteStepError(RuntimeError):
    """This rank's step was fine, but another rank's raised: every rank raises, nothing was updated."""


class RanksOutOfStepError(RuntimeError):
    """A step failed where the ranks could not agree on it; the engine refuses further steps."""


def describe_remote_failure(count: int, rank_sum: int) -> str:
    """The message of ``RemoteStepError`` for ``count`` failed ranks whose ranks sum to ``rank_sum``."""
    who = f"rank {rank_sum}" if count == 1 else f"{count} ranks"
    return (
        f"engine.step failed on {who} (see the error there); every rank raises and no rank updated "
        "anything, so the state passed in is still valid on every rank and the next engine.step on "
        "every rank starts together"
    )


class StepVote:
    """One step's agreement points between forward and backward (see the module docstring).

    Every rank calls ``vote(failed)`` at the same points; a rank that saw no failure gets
    ``RemoteStepError`` when another rank failed. ``failed_here`` records that this rank has voted
    "failed" (it then raises its own error)."""

    def __init__(self, group: Any, rank: int, device: torch.device) -> None:
        self.group, self.rank, self.device = group, rank, device
        self.failed_here = False
        self.votes = 0

    def vote(self, failed: bool = False) -> None:
        # [failed ranks, sum of their ranks]: one rank is named exactly, several are counted
        ballot = torch.tensor([float(failed), float(self.rank if failed else 0)], device=self.device)
        collectives.all_reduce_into(ballot, self.group)
        self.votes += 1
        self.failed_here = self.failed_here or failed
        count, rank_sum = (int(v) for v in ballot.tolist())
        if count and not failed:
            raise RemoteStepError(describe_remote_failure(count, rank_sum))

    def __call__(self) -> None:
        self.vote(False)
