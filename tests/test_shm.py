"""Shared-memory collectives (parallel/shm.py) on real gloo ranks: equal to gloo's, in pieces, for every
dtype; a failing peer fails the others fast; nothing left in /dev/shm; opting out keeps gloo."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist

from zerostep.parallel import collectives
from zerostep.parallel.launch import RankFailure, spawn_ranks
from zerostep.parallel.shm import shared_memory_supported

pytestmark = pytest.mark.skipif(
    not shared_memory_supported(), reason="needs x86-64 and /dev/shm (elsewhere gloo's transport is kept)"
)

SLOT_BYTES = 4096  # small buffers: every message over 4 KiB goes in several pieces
DTYPES = (torch.float32, torch.bfloat16, torch.int64)
SIZES = (0, 1, 7, 1000, 3001)  # elements per rank's row; 1000 and 3001 span several 4 KiB pieces


def _rank_input(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    # small integers: exact in every dtype here, so sums are bit-exact in any order
    return ((torch.arange(numel) * (rank + 1) + rank) % 97).to(dtype)


def _own_files() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("zerostep-")}


def check_collectives(rank: int, world_size: int) -> int:
    before = _own_files()
    assert collectives.attach_shared_memory(None, slot_bytes=SLOT_BYTES)
    assert collectives.attach_shared_memory(dist.group.WORLD)  # idempotent: the same channel
    assert collectives.shared_memory_channel(None).slot_bytes == SLOT_BYTES
    dist.barrier()
    assert _own_files() == before  # unlinked once every rank had mapped them
    checked = 0
    for dtype in DTYPES:
        for width in SIZES:
            numel = width * world_size
            inputs = [_rank_input(r, numel, dtype) for r in range(world_size)]
            total = torch.stack(inputs).sum(0).to(dtype)

            flat = inputs[rank].clone()
            handle = collectives.all_reduce_into(flat, None, async_op=True)
            assert handle.wait() and torch.equal(flat, total), (dtype, width)

            shard = torch.full((width,), -1, dtype=dtype)
            assert collectives.reduce_scatter_into(shard, inputs[rank].clone(), None) is None
            assert torch.equal(shard, total.view(world_size, width)[rank]), (dtype, width)

            full = torch.full((numel,), -1, dtype=dtype)
            rows = full.view(world_size, width)
            rows[rank] = inputs[rank][:width]
            collectives.all_gather_rows(full, None, async_op=True).wait()
            want = torch.stack([inputs[r][:width] for r in range(world_size)]).view(-1)
            assert torch.equal(full, want), (dtype, width)

            # the eager flat functions, bucketed, go through the channel too
            assert torch.equal(collectives.all_reduce_flat(inputs[rank], None, 5), total)
            assert torch.equal(collectives.reduce_scatter_flat(inputs[rank], None, 5), shard)
            assert torch.equal(collectives.all_gather_flat(inputs[rank][:width], None, 5), want)
            checked += 1
    collectives.detach_shared_memory(None)
    assert collectives.shared_memory_channel(None) is None
    # and gloo serves again after detaching
    flat = inputs[rank].clone()
    collectives.all_reduce_into(flat, None)
    assert torch.equal(flat, total)
    return checked


def half_precision_sums(rank: int, world_size: int) -> bool:
    assert collectives.attach_shared_memory(None)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(999, generator=gen).to(torch.bfloat16) for _ in range(world_size)]
    want = torch.stack(inputs).float().sum(0).to(torch.bfloat16)  # one rounding, as gloo's sum
    flat = inputs[rank].clone()
    collectives.all_reduce_into(flat, None)
    shard = torch.empty(333, dtype=torch.bfloat16)
    collectives.reduce_scatter_into(shard, inputs[rank].clone(), None)
    return torch.equal(flat, want) and torch.equal(shard, want.view(3, 333)[rank])


def test_half_precision_sums_of_three_round_once():
    assert spawn_ranks(half_precision_sums, 3, timeout=60) == [True] * 3


@pytest.mark.parametrize("world_size", [3])  # 2 ranks: every other shm test runs at 2
def test_shared_memory_collectives_equal_the_sums(world_size):
    results = spawn_ranks(check_collectives, world_size, timeout=120)
    assert results == [len(DTYPES) * len(SIZES)] * world_size


def _mapped_shm_bytes() -> int:
    """Bytes of this process's address space mapped from (deleted) zerostep files in /dev/shm."""
    total = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "/dev/shm/zerostep-" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                total += hi - lo
    return total


def dropped_group_unmaps(rank: int, world_size: int) -> tuple[int, int]:
    import gc

    group = dist.new_group(backend="gloo")
    assert collectives.attach_shared_memory(group, slot_bytes=1 << 20)
    mapped = _mapped_shm_bytes()
    flat = torch.ones(8)
    collectives.all_reduce_into(flat, group)
    dist.barrier()
    dist.destroy_process_group(group)
    del group
    gc.collect()
    return mapped, _mapped_shm_bytes()


def test_a_destroyed_group_releases_its_channel():
    for mapped, after in spawn_ranks(dropped_group_unmaps, 2, timeout=60):
        assert mapped >= 2 * 2 * (1 << 20) and after == 0  # every rank's two buffers mapped, then none


def opt_out(rank: int, world_size: int) -> tuple[bool, ...]:
    os.environ["ZEROSTEP_SHM"] = "0"
    off = collectives.attach_shared_memory(None)
    os.environ["ZEROSTEP_SHM"] = "1" if rank == 0 else "0"  # ranks disagree: all fall back alike
    disagree = collectives.attach_shared_memory(None)
    os.environ["ZEROSTEP_SHM"] = "1"
    os.environ["ZEROSTEP_GLOO_COLLECTIVES"] = "native" if rank == 1 else ""
    native_on_one = collectives.attach_shared_memory(None)
    os.environ["ZEROSTEP_GLOO_COLLECTIVES"] = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        too_small = collectives.attach_shared_memory(None, slot_bytes=100 if rank == 0 else 8192)
    said = [str(w.message) for w in caught]
    warning = "shared-memory collectives off: slot_bytes=100 must be at least 4096 bytes"
    assert said == ([warning] if rank == 0 else [])
    flat = torch.ones(4)
    collectives.all_reduce_into(flat, None)  # and the group still works, over gloo
    return off, disagree, native_on_one, too_small, flat.tolist()


def test_opting_out_keeps_gloo_on_every_rank():
    got = spawn_ranks(opt_out, 2, timeout=60)
    assert got == [(False, False, False, False, [2.0] * 4)] * 2


def exit_mid_collective(rank: int, world_size: int) -> None:
    assert collectives.attach_shared_memory(None)
    # both ranks past the attach (whose own handshake runs over gloo) before rank 1 dies: a peer that
    # exits inside that handshake leaves the survivor in a gloo wait, which only gloo's timeout ends
    dist.barrier()
    if rank == 1:
        os._exit(3)  # dies without a word, like a killed process
    start = time.monotonic()
    try:
        collectives.all_reduce_into(torch.ones(10), None)
    finally:
        assert time.monotonic() - start < 10  # found out from the pid, long before the 60 s timeout


def test_a_peer_that_exits_fails_the_collective_fast():
    with pytest.raises(RankFailure, match=r"rank 1 \(pid \d+\) exited during a shared-memory collective"):
        spawn_ranks(exit_mid_collective, 2, timeout=60, collective_timeout=60)


def stall_then_collective(rank: int, world_size: int) -> None:
    assert collectives.attach_shared_memory(None)
    channel = collectives.shared_memory_channel(None)
    channel.timeout_s = 1.0
    if rank == 1:
        time.sleep(4)  # alive but late: the others give up at the timeout
        return
    with pytest.raises(RuntimeError, match="did not reach a shared-memory collective within 1 s"):
        collectives.all_reduce_into(torch.ones(10), None)
    # the ranks are out of step now: every later collective on the channel fails at once
    collectives.all_gather_rows(torch.ones(10), None)


def test_a_peer_that_never_arrives_times_out_and_breaks_the_channel():
    with pytest.raises(RankFailure, match="unusable after an earlier failure: rank 0: rank 1 did not reach"):
        spawn_ranks(stall_then_collective, 2, timeout=60)


def test_process_start_tells_a_live_process_from_an_exited_one():
    import subprocess

    from zerostep.parallel.shm import _process_start

    assert _process_start(os.getpid()) > 0
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert _process_start(child.pid) >= _process_start(os.getpid())
    finally:
        child.kill()
    time.sleep(0.2)  # killed but not reaped: a zombie counts as exited
    assert _process_start(child.pid) == -1
    child.wait()
    assert _process_start(child.pid) == -1
