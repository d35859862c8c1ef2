"""Host memory figures for the CPU accelerator, from ``/proc`` (no psutil): this process's resident set,
its peak (the kernel's high-water mark, which ``reset_peak`` restarts), the machine's total and available.

Off Linux the peak is the largest resident set seen by these calls (DeepSpeed's CPU accelerator does
the same with psutil).
"""

from __future__ import annotations

import os
import resource
import sys

_observed_peak = 0


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss() -> int:
    """Bytes resident now."""
    global _observed_peak
    kib = _status_kib("VmRSS")
    if kib is not None:
        value = kib * 1024
    else:  # no /proc: the lifetime peak is the best figure getrusage gives
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        value = maxrss if sys.platform == "darwin" else maxrss * 1024
    _observed_peak = max(_observed_peak, value)
    return value


def peak_rss() -> int:
    """Bytes resident at the peak since start (or since the last ``reset_peak``)."""
    kib = _status_kib("VmHWM")
    rss()
    # the kernel's mark and VmRSS are kept by separate (batched) counters: a figure rss() reported
    # may exceed the mark by a few pages, and the peak must never be below a value already seen
    return max(kib * 1024, _observed_peak) if kib is not None else _observed_peak


def reset_peak() -> None:
    """Restart the peak from the current resident set (Linux: ``5`` into ``/proc/self/clear_refs``)."""
    global _observed_peak
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    _observed_peak = 0
    rss()


def total() -> int:
    """Physical memory of the machine, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available() -> int:
    """Memory available to new allocations without swapping (``MemAvailable``), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def numa_nodes_with_cpus() -> int:
    """NUMA nodes that have CPUs (DeepSpeed's CPU device count); 1 where unknown."""
    base = "/sys/devices/system/node"
    try:
        nodes = [n for n in os.listdir(base) if n.startswith("node") and n[4:].isdigit()]
    except OSError:
        return 1
    count = 0
    for node in nodes:
        try:
            with open(os.path.join(base, node, "cpulist")) as f:
                count += bool(f.read().strip())
        except OSError:
            continue
    return max(count, 1)
