"""Collectives through shared memory between the ranks of a group that share one host (CPU, gloo).

Gloo moves every byte through loopback TCP: the kernel copies it into a socket and out again, and its
threads compete with the ranks' compute for the same cores. Ranks on one host can instead read each
other's memory: each rank maps a file in ``/dev/shm`` of its own plus every peer's, and a collective is
plain copies and sums between those mappings, synchronized by barriers on counters in the same memory.
Measured for 16 MB fp32 on 2 ranks here: all-reduce 4.0 ms against gloo's 13.8 ms. DeepSpeed's CPU
accelerator does the same for its all-reduce (``deepspeed/comm/ccl`` with its shm path); this is the
algorithm, not its code.

Per rank, one file: a 4 KiB control page (a token, the pid, the barrier counter on its own cache line)
then two message buffers of ``slot_bytes`` each. Collectives alternate buffers, so a rank writing the
next message never overwrites one a slower peer is still reading: writing buffer ``b`` again comes two
barriers later, and every peer has finished reading ``b`` before it reaches the first of them.
Messages larger than a buffer go in pieces.

- ``all_reduce_``: copy into my buffer; barrier; sum chunk ``rank`` over every buffer into my buffer;
  barrier; copy every rank's reduced chunk out. Per rank: 3 P of writes, 3 P of reads for P bytes.
- ``reduce_scatter_into``: copy ``flat`` [N * S] in; barrier; ``out`` [S] = sum of every buffer's row
  ``rank``.
- ``all_gather_rows``: copy my row of ``full`` [N * S] in; barrier; copy every other row out.

The barrier spins on the peers' counters (yielding the core), sleeps once the wait passes a few
milliseconds, and raises ``RuntimeError`` when a peer's process has exited or the group's timeout
passes, so a failing rank never leaves the others hanging. Its correctness needs stores to become
visible in program order, which x86-64 guarantees; other machines keep gloo (``attach`` returns None),
as do groups whose ranks do not share ``/dev/shm``, hosts whose ``/dev/shm`` cannot hold the buffers
(checked with ``posix_fallocate`` up front: an overfull tmpfs would otherwise SIGBUS on first touch),
and ``ZEROSTEP_SHM=0``. Files are unlinked as soon as every rank has mapped them, so a crash leaves
nothing in ``/dev/shm``.
"""

from __future__ import annotations

import datetime
import mmap
import os
import platform
import secrets
import struct
import time
import warnings

import torch
import torch.distributed as dist

SHM_ENV = "ZEROSTEP_SHM"
SLOT_BYTES_ENV = "ZEROSTEP_SHM_SLOT_BYTES"
DEFAULT_SLOT_BYTES = 32 << 20  # per buffer; two per rank
_CONTROL_BYTES = 4096
# int64 words of the control page: a token, the pid and its start time (to tell the process from a later
# one with the same pid), and the barrier counter on its own cache line
_TOKEN, _PID, _START, _COUNTER = 0, 1, 2, 8
_SPIN_S = 0.002  # yield-spin this long before sleeping between polls
_POLL_SLEEP_S = 50e-6
_LIVENESS_EVERY_S = 0.05


def shared_memory_supported() -> bool:
    """Whether this machine can run the channel: x86-64 (stores visible in program order) and /dev/shm."""
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")


def _enabled() -> bool:
    if os.environ.get(SHM_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return shared_memory_supported()


def _slot_bytes() -> int:
    raw = os.environ.get(SLOT_BYTES_ENV)
    if not raw:
        return DEFAULT_SLOT_BYTES
    try:
        value = int(raw)
    except ValueError as e:
        raise ValueError(f"{SLOT_BYTES_ENV}={raw!r} is not a number of bytes") from e
    return _checked_slot_bytes(value, SLOT_BYTES_ENV)


def _checked_slot_bytes(value: int, name: str) -> int:
    """At least 4096 bytes, rounded down to a multiple of 64 (whole elements of every dtype)."""
    if value < 4096:
        raise ValueError(f"{name}={value!r} must be at least 4096 bytes")
    return value - value % 64


def _group_timeout_s(group: dist.ProcessGroup) -> float:
    try:
        timeout = group._get_backend(torch.device("cpu")).options._timeout
        if isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0:
            return timeout.total_seconds()
    except (AttributeError, RuntimeError):
        pass
    from zerostep.parallel.groups import default_timeout_s

    return default_timeout_s()


class SharedMemoryChannel:
    """Shared-memory collectives for ``group``; build with ``attach`` (collective over the group)."""

    def __init__(self, group: dist.ProcessGroup, maps: list[mmap.mmap], slot_bytes: int) -> None:
        """``maps``: every rank's file, mapped, in rank order (``attach`` opens them)."""
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.slot_bytes, self.timeout_s = slot_bytes, _group_timeout_s(group)
        self.pids = [_word(m, _PID) for m in maps]
        # Peers whose process this one can see (not so across pid namespaces sharing /dev/shm): a wait
        # on them ends as soon as they exit; on the others, at the timeout.
        self._started = [_word(m, _START) for m in maps]
        self._watched = [_process_start(pid) == start for pid, start in zip(self.pids, self._started)]
        self._maps = maps
        self._control = [memoryview(m)[:_CONTROL_BYTES].cast("q") for m in maps]  # int64 words
        # [2, slot_bytes] per rank: the two message buffers
        self._buffers = [
            torch.frombuffer(m, dtype=torch.uint8, offset=_CONTROL_BYTES).view(2, slot_bytes) for m in maps
        ]
        self._generation = self._control[self.rank][_COUNTER]
        self._next_buffer = 0
        self._failure: str | None = None  # set by a failed barrier: the ranks are out of step for good

    # ---- set-up ----

    @staticmethod
    def attach(
        group: dist.ProcessGroup, slot_bytes: int | None = None, allowed: bool = True
    ) -> SharedMemoryChannel | None:
        """A channel over ``group`` if every rank can map every other rank's file, else None (on every
        rank alike). Collective: every rank of ``group`` must call it. Every per-rank setting (``allowed``,
        ``ZEROSTEP_SHM``, the slot size) goes into one vote first, so ranks that disagree all keep gloo."""
        if group is None or dist.get_world_size(group) < 2:
            return None
        try:
            checked = _slot_bytes() if slot_bytes is None else _checked_slot_bytes(slot_bytes, "slot_bytes")
        except ValueError as e:
            warnings.warn(f"shared-memory collectives off: {e}", stacklevel=2)
            checked, allowed = 0, False
        enabled = torch.tensor([1 if allowed and _enabled() else 0], dtype=torch.int64)
        dist.all_reduce(enabled, op=dist.ReduceOp.MIN, group=group)
        if not enabled.item():
            return None
        slot_bytes = checked
        size = _CONTROL_BYTES + 2 * slot_bytes
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        run_id = [secrets.token_hex(8) if rank == 0 else None]
        dist.broadcast_object_list(run_id, group_src=0, group=group)
        paths = [f"/dev/shm/zerostep-{run_id[0]}-{r}" for r in range(world_size)]
        token = secrets.randbits(62)
        maps: list[mmap.mmap | None] = [None] * world_size
        agreed = torch.zeros(1, dtype=torch.int64)
        try:
            ok = True
            try:
                maps[rank] = _create(paths[rank], size, token)
            except OSError:
                ok = False
            tokens = [None] * world_size
            dist.all_gather_object(tokens, token if ok else None, group=group)
            ok = ok and all(t is not None for t in tokens)
            if ok:
                try:
                    for r in range(world_size):
                        if r != rank:
                            maps[r] = _open(paths[r], size)
                            ok = ok and _word(maps[r], _TOKEN) == tokens[r]
                except OSError:
                    ok = False
            agreed[0] = 1 if ok else 0
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)  # every rank has opened every file
        finally:  # also when a peer fails mid-set-up: nothing stays in /dev/shm
            if maps[rank] is not None:
                try:
                    os.unlink(paths[rank])
                except FileNotFoundError:
                    pass
            if not agreed.item():
                for m in maps:
                    if m is not None:
                        m.close()
        if not agreed.item():
            return None
        return SharedMemoryChannel(group, maps, slot_bytes)

    # ---- synchronization ----

    def barrier(self) -> None:
        """Return once every rank has called ``barrier`` as many times as this one."""
        if self._failure is not None:
            raise RuntimeError(f"shared-memory channel unusable after an earlier failure: {self._failure}")
        self._generation += 1
        generation = self._generation
        self._control[self.rank][_COUNTER] = generation
        start = time.monotonic()
        last_check = start
        for peer in range(self.world_size):
            counters = self._control[peer]
            while counters[_COUNTER] < generation:
                now = time.monotonic()
                if now - start < _SPIN_S:
                    os.sched_yield()
                    continue
                time.sleep(_POLL_SLEEP_S)
                if now - last_check >= _LIVENESS_EVERY_S:
                    last_check = now
                    self._check_peer(peer, now - start)

    def _check_peer(self, peer: int, waited_s: float) -> None:
        started = _process_start(self.pids[peer]) if self._watched[peer] else None
        if started is not None and started != self._started[peer]:
            self._failure = (
                f"rank {self.rank}: rank {peer} (pid {self.pids[peer]}) exited during a shared-memory "
                f"collective"
            )
        elif waited_s > self.timeout_s:
            self._failure = (
                f"rank {self.rank}: rank {peer} did not reach a shared-memory collective within "
                f"{self.timeout_s:g} s (the process group's timeout); did it fail?"
            )
        if self._failure is not None:
            raise RuntimeError(self._failure)

    def _buffer(self, rank: int, index: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
        return self._buffers[rank][index].view(dtype)[:numel]

    def _take_buffer(self) -> int:
        index, self._next_buffer = self._next_buffer, 1 - self._next_buffer
        return index

    def _piece_numel(self, dtype: torch.dtype) -> int:
        return self.slot_bytes // dtype.itemsize

    # ---- collectives ----

    def all_reduce_(self, flat: torch.Tensor) -> None:
        """``flat`` (contiguous) = its sum over the ranks, in place."""
        flat = flat.view(-1)
        cap = self._piece_numel(flat.dtype)
        for start in range(0, flat.numel(), cap):
            self._all_reduce_piece(flat[start : start + cap])

    def _all_reduce_piece(self, piece: torch.Tensor) -> None:
        n, index = piece.numel(), self._take_buffer()
        buffers = [self._buffer(r, index, piece.dtype, n) for r in range(self.world_size)]
        buffers[self.rank].copy_(piece)
        chunk = -(-n // self.world_size)
        bounds = [(min(r * chunk, n), min((r + 1) * chunk, n)) for r in range(self.world_size)]
        self.barrier()
        a, b = bounds[self.rank]
        _sum_into(buffers[self.rank][a:b], [buf[a:b] for buf in buffers])
        self.barrier()
        for r, (a, b) in enumerate(bounds):
            piece[a:b].copy_(buffers[r][a:b])

    def reduce_scatter_into(self, out: torch.Tensor, flat: torch.Tensor) -> None:
        """``out`` [S] = row ``rank`` of the sum over ranks of ``flat`` [N * S] (contiguous)."""
        rows = flat.view(self.world_size, -1)  # [N, S]
        width_cap = max(1, self._piece_numel(flat.dtype) // self.world_size)
        for c0 in range(0, rows.shape[1], width_cap):
            c1 = min(c0 + width_cap, rows.shape[1])
            index, width = self._take_buffer(), c1 - c0
            buffers = [
                self._buffer(r, index, flat.dtype, self.world_size * width).view(self.world_size, width)
                for r in range(self.world_size)
            ]
            buffers[self.rank].copy_(rows[:, c0:c1])
            self.barrier()
            _sum_into(out[c0:c1], [b[self.rank] for b in buffers])  # every rank's copy of my row

    def all_gather_rows(self, full: torch.Tensor) -> None:
        """Fill every row of ``full`` [N * S] from its rank; row ``rank`` already holds this rank's."""
        rows = full.view(self.world_size, -1)  # [N, S]
        cap = self._piece_numel(full.dtype)
        for c0 in range(0, rows.shape[1], cap):
            c1 = min(c0 + cap, rows.shape[1])
            index = self._take_buffer()
            self._buffer(self.rank, index, full.dtype, c1 - c0).copy_(rows[self.rank, c0:c1])
            self.barrier()
            for r in range(self.world_size):
                if r != self.rank:
                    rows[r, c0:c1].copy_(self._buffer(r, index, full.dtype, c1 - c0))

    def close(self) -> None:
        for words in self._control:
            words.release()
        self._buffers, self._control = [], []
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # a tensor view still alive; unmapped when it is collected
        self._maps = []


def _sum_into(out: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """``out`` = the sum of ``parts`` (``out`` may be one of them). Half-precision sums of more than two
    go through fp32 and round once, as gloo's reduction does."""
    if out.numel() == 0:
        return
    if len(parts) > 2 and parts[0].dtype in (torch.float16, torch.bfloat16):
        acc = parts[0].float()
        for part in parts[1:]:
            acc.add_(part)
        out.copy_(acc)
        return
    others = [part for part in parts if part.data_ptr() != out.data_ptr()]
    if len(others) == len(parts):  # ``out`` is none of them
        torch.add(others[0], others[1], out=out)
        others = others[2:]
    for part in others:
        out.add_(part)


def _create(path: str, size: int, token: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)  # ENOSPC now, not SIGBUS on first touch of an overfull tmpfs
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    pid = os.getpid()
    for word, value in ((_TOKEN, token), (_PID, pid), (_START, _process_start(pid)), (_COUNTER, 0)):
        struct.pack_into("=q", m, 8 * word, value)
    return m


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or
    -1 if it has exited (or there is no ``/proc``), None if it cannot be told now."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return -1
    except OSError:  # out of file descriptors or memory: unknown, not gone
        return None
    # the command name (field 2) may hold spaces and parentheses: fields after it follow the last ")"
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # exited, not yet reaped by its parent
        return -1
    return int(fields[19])


def _word(m: mmap.mmap, word: int) -> int:
    return struct.unpack_from("=q", m, 8 * word)[0]


def _open(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size != size:
            raise OSError(f"{path} has the wrong size")
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
