"""A rank that fails mid-collective makes the run fail fast with every rank's story, leaving no process."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from zerostep.parallel.collectives import all_reduce_flat
from zerostep.parallel.launch import RankFailure, spawn_ranks


def _spawned_children() -> list[int]:
    """Live (non-zombie) processes started by ``spawn_ranks`` from this process."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == os.getpid() and state != "Z" and b"spawn_main" in cmdline:
            pids.append(int(entry))
    return pids


def _fail_mid_collective(rank: int, world_size: int, how: str) -> None:
    flat = torch.ones(8)
    all_reduce_flat(flat)  # everyone gets this far together
    if rank == world_size - 1:
        if how == "raise":
            raise RuntimeError("rank failed on purpose between collectives")
        os._exit(3)  # dies without a word, like an OOM kill
    for _ in range(3):  # the survivors keep going and must not hang
        flat = all_reduce_flat(flat)
    dist.barrier()


@pytest.mark.parametrize("world_size,how", [(3, "raise"), (2, "exit")])
def test_failing_rank_fails_everyone_within_timeout(world_size, how):
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn_ranks(_fail_mid_collective, world_size, how, timeout=60, collective_timeout=10)
    elapsed = time.monotonic() - start
    message = str(info.value)
    if how == "raise":
        assert "rank failed on purpose between collectives" in message
    else:
        assert f"rank {world_size - 1} exited with code 3" in message
    # The survivors fail (a closed connection or the collective timeout) instead of finishing.
    assert all(f"--- rank {r} ---" in message or f"ranks [{r}" in message for r in range(world_size)), message
    assert elapsed < 45, f"took {elapsed:.0f} s"
    assert _spawned_children() == []
