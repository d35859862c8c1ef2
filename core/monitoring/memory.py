"""``memory_breakdown: true``: this rank's memory at each ``steps_per_print``, in DeepSpeed's
``see_memory_usage`` terms (MA/Max_MA: CUDA allocated and its peak, CA/Max_CA: reserved by the caching
allocator and its peak) plus the process's resident host memory."""

from __future__ import annotations

import os
import resource

import torch

_GB = 1024**3


def host_rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``), else the peak from ``getrusage``."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_line(rank: int, step: int, device: torch.device) -> str:
    line = f"[rank {rank}] step={step} memory:"
    if device.type == "cuda":
        c = torch.cuda
        ma, max_ma = c.memory_allocated(device) / _GB, c.max_memory_allocated(device) / _GB
        ca, max_ca = c.memory_reserved(device) / _GB, c.max_memory_reserved(device) / _GB
        line += f" MA {ma:.2f} GB  Max_MA {max_ma:.2f} GB  CA {ca:.2f} GB  Max_CA {max_ca:.2f} GB |"
    return line + f" host RSS {host_rss_bytes() / _GB:.2f} GB"
