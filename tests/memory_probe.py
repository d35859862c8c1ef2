"""Peak CPU memory of a stretch of code, from the profiler's allocation events (importable by spawned ranks).

``torch.cuda.max_memory_allocated`` has no CPU counterpart, but with ``profile_memory=True`` the profiler
records every allocation and free of PyTorch's CPU allocator (compiled code's buffers included) with its
size and time. Summed in time order they give the bytes allocated since the profile started; the peak
of that sum up to a marker (a ``record_function`` range) is the high-water mark of everything the code
allocated before the marker, whatever held it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile, record_function


def peak_bytes(
    run: Callable[[Callable[[], None]], Any], marker: str = "memory_probe.mark"
) -> tuple[int, Any]:
    """``run(mark)`` under the profiler; returns (peak bytes allocated above the start before the first
    ``mark()`` call, or before the end if it never calls it; what ``run`` returned)."""

    def mark() -> None:
        with record_function(marker):
            pass

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run(mark)
    from torch._C._profiler import _EventType  # private, but the only way to the raw allocation events

    allocations, marks = [], []

    def visit(node) -> None:
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        elif node.tag == _EventType.TorchOp and node.name == marker:
            marks.append(node.start_time_ns)
        for child in node.children:
            visit(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        visit(root)
    end = min(marks) if marks else float("inf")
    live = peak = 0
    for time_ns, size in sorted(allocations):
        if time_ns > end:
            break
        live += size
        peak = max(peak, live)
    return peak, out

