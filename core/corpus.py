"""A text corpus every machine has without a download: the Python standard library's own sources.

Files are chosen deterministically (sorted paths of the stdlib's top-level ``*.py`` files) and read as
bytes until ``max_bytes``. Batches are random windows drawn from a generator seeded by (seed, step), so
a run is reproducible and every rank can cut its own slice of the same global batch.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def stdlib_corpus(max_bytes: int = 4_000_000) -> torch.Tensor:
    """uint8 [n] of concatenated stdlib sources (n <= max_bytes)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Python sources found in the standard library at {root}")
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    blob = b"\n".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def split_corpus(data: torch.Tensor, val_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = max(1, int(len(data) * val_fraction))
    return data[:-n_val], data[-n_val:]


def window_batch(data: torch.Tensor, batch_size: int, block_size: int, seed: int, step: int) -> dict:
    """{"idx": int64 [B, T], "targets": int64 [B, T]}: random windows, next-byte targets."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - block_size - 1, (batch_size,), generator=gen)
    offsets = torch.arange(block_size + 1)
    windows = data[starts[:, None] + offsets[None, :]].long()  # [B, T + 1]
    return {"idx": windows[:, :-1], "targets": windows[:, 1:]}
