"""Chunked copies between device buffers and host buffers, overlapped with work on the host.

ZeRO-Offload's step moves every gradient shard device -> host, updates it on the CPU, and moves the
updated parameters host -> device. ``run_pipeline`` orders that as a pipeline over chunks (pieces of
the flat shards): every device -> host copy is queued up front, then chunk by chunk the host waits for
its gradient, updates it, and queues its parameters' copy back, so the copy of one chunk overlaps the
update of the next (and, on CUDA, both directions run on side streams while the host computes).

``HostTransfer`` is the mover. On CUDA the copies are ``non_blocking`` on two side streams (one per
direction, so PCIe runs both ways at once) from and into pinned host memory, and each device -> host
copy records an event the host waits on. Elsewhere (a CPU engine, where "device" and "host" are the
same memory) the copies are plain synchronous ``copy_`` between distinct tensors: the same chunks, in
the same order, through the same calls; only the stream, event and pinning calls are CUDA-only.
Knows nothing of optimizers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

CHUNK_ALIGN = 16  # chunk boundaries on 16-element multiples, like the flat layouts' entries


class Chunk(NamedTuple):
    """Elements [lo, hi) of group ``group``'s flat buffer."""

    group: str
    lo: int
    hi: int

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def plan_chunks(numels: Mapping[str, int], chunk_numel: int | None) -> list[Chunk]:
    """Each group's [0, numel) cut into chunks of at most ``chunk_numel`` elements (rounded up to a
    multiple of ``CHUNK_ALIGN``; None or >= numel: one chunk per group), groups in the given order."""
    if chunk_numel is not None and chunk_numel <= 0:
        raise ValueError(f"chunk_numel must be positive, got {chunk_numel}")
    step = None if chunk_numel is None else -(-chunk_numel // CHUNK_ALIGN) * CHUNK_ALIGN
    chunks = []
    for group, numel in numels.items():
        size = numel if step is None else step
        lo = 0
        while lo < numel:
            hi = min(numel, lo + size)
            chunks.append(Chunk(group, lo, hi))
            lo = hi
    return chunks


class HostTransfer:
    """Copies device <-> host for one engine device. ``pin_memory`` (CUDA only): host buffers come from
    pinned memory, which the asynchronous copies need to overlap the host's work."""

    def __init__(self, device: torch.device, pin_memory: bool = False) -> None:
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.pin_memory = bool(pin_memory) and self.on_cuda
        self.to_host_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.to_device_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.bytes_to_host = 0  # totals since construction, for benchmarks and reports
        self.bytes_to_device = 0

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A new host buffer [numel] (pinned when asked, on CUDA)."""
        return torch.empty(numel, dtype=dtype, device="cpu", pin_memory=self.pin_memory)

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A new host tensor holding ``t``'s values (never ``t`` itself, even when ``t`` is on the host)."""
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pin_memory)
        out.copy_(t)
        return out

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        """Start ``dst.copy_(src)`` from the device into host memory; returns what ``wait`` takes.

        On CUDA the side stream first waits for the work queued so far on the current stream (which
        produced ``src``)."""
        self.bytes_to_host += src.numel() * src.element_size()
        if not self.on_cuda:
            dst.copy_(src)
            return None
        stream = self.to_host_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def wait(self, handle: Any) -> None:
        """Block the host until a ``to_host`` copy has landed."""
        if handle is not None:
            handle.synchronize()

    def to_device(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Start ``dst.copy_(src)`` from host memory to the device (``src`` must stay unchanged until
        ``finish``'s stream order has passed it: the caller's next step, see ``run_pipeline``)."""
        self.bytes_to_device += src.numel() * src.element_size()
        if not self.on_cuda:
            dst.copy_(src)
            return
        stream = self.to_device_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # work that still reads ``dst``
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def finish(self) -> None:
        """Work queued on the current stream from now on runs after every copy started so far."""
        if self.on_cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.to_host_stream)
            current.wait_stream(self.to_device_stream)


def run_pipeline(
    chunks: Sequence[Chunk],
    fetch: Callable[[Chunk], Any],
    update: Callable[[Chunk], None],
    store: Callable[[Chunk], None],
    wait: Callable[[Any], None],
) -> None:
    """All ``fetch``es first (device -> host, queued in chunk order), then for each chunk in order:
    ``wait`` for its fetch, ``update`` it on the host, ``store`` it (host -> device). The store of chunk
    i is queued before the update of chunk i + 1 begins, so the two overlap.

    Host buffers are safe to reuse at the next call: a chunk's host gradient is written by its fetch
    only after the previous call's update of it returned (the host waited), and its host parameters are
    rewritten only after this call's stores reached the device (the next call's fetches follow the
    device work that follows ``HostTransfer.finish``)."""
    handles = [fetch(chunk) for chunk in chunks]
    for chunk, handle in zip(chunks, handles):
        wait(handle)
        update(chunk)
        store(chunk)
