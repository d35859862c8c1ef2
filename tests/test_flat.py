"""Shard then gather is the identity: hypothesis cases of named tensors of mixed dtypes, world sizes 1-5."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zerostep.parallel.collectives import all_gather_flat
from zerostep.parallel.flat import FlatLayout
from zerostep.parallel.launch import spawn_ranks

DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")

# A case is a list of (shape, dtype name); dims of 0 give empty tensors, small dims give tensors smaller
# than the world size.
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
cases = st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=6)


def _tensors(case: list, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic values for a case (every rank builds the same ones)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (shape, dtype_name) in enumerate(case):
        dtype = getattr(torch, dtype_name)
        if dtype == torch.bool:
            value = torch.randint(0, 2, shape, generator=g).bool()
        elif dtype.is_floating_point:
            value = torch.randn(shape, generator=g).to(dtype)
        else:
            value = torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)
        out[f"t{i}"] = value
    return out


def _layouts(tensors: dict[str, torch.Tensor], world_size: int) -> dict[torch.dtype, FlatLayout]:
    """One flat layout per dtype, as ZeRO builds them."""
    by_dtype: dict[torch.dtype, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault(t.dtype, {})[name] = t
    return {dtype: FlatLayout.of(group, world_size) for dtype, group in by_dtype.items()}


def _roundtrip(case: list, seed: int, world_size: int, rank: int, gather) -> None:
    tensors = _tensors(case, seed)
    for dtype, layout in _layouts(tensors, world_size).items():
        full = layout.flatten(tensors)  # [padded_numel]
        assert full.numel() == layout.padded_numel == layout.shard_numel * world_size
        assert layout.padded_numel == max(1, -(-layout.numel // world_size)) * world_size
        assert not full[layout.numel :].any(), "padding must be zero"
        shard = layout.shard(full, rank).clone()
        assert shard.numel() == layout.shard_numel and shard.dtype == dtype
        gathered = gather(layout, full, shard)
        assert gathered.dtype == dtype and gathered.numel() == layout.padded_numel
        assert not gathered[layout.numel :].any(), "padding must be zero after gathering"
        for name, view in layout.unflatten(gathered).items():
            assert view.shape == tensors[name].shape and torch.equal(view, tensors[name]), name


@given(case=cases, world_size=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_shards_concatenate_to_the_flat_buffer(case, world_size, seed):
    """Single process: the world's shards, concatenated in rank order, are the padded flat buffer."""

    def gather(layout, full, shard):
        shards = [layout.shard(full, r).clone() for r in range(world_size)]
        return torch.cat(shards)

    for rank in range(world_size):
        _roundtrip(case, seed, world_size, rank, gather)


def _draw_cases(n: int) -> list:
    """``n`` hypothesis-generated cases (deterministic under the repo profile), to ship to ranks at once."""
    drawn = []

    @settings(max_examples=n, database=None)
    @given(case=cases)
    def collect(case):
        drawn.append(case)

    collect()
    return drawn


def _gather_all_cases(rank: int, world_size: int, all_cases: list) -> int:
    for i, case in enumerate(all_cases):
        try:
            _roundtrip(case, i, world_size, rank, lambda _layout, _full, shard: all_gather_flat(shard))
        except Exception as e:
            raise AssertionError(f"case {i} {case} at world size {world_size}: {e}") from e
    return len(all_cases)


def test_draw_cases_cover_edge_shapes():
    drawn = _draw_cases(40)
    numels = [torch.Size(shape).numel() for case in drawn for shape, _ in case]
    assert 0 in numels and any(0 < n < 5 for n in numels)
    assert len({dtype for case in drawn for _, dtype in case}) >= 5


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_shard_then_gather_is_identity_on_real_ranks(world_size):
    """One spawn per world size runs every case through the real gloo all-gather."""
    drawn = _draw_cases(40)
    if world_size == 1:
        assert _gather_all_cases(0, 1, drawn) == len(drawn)
        return
    assert spawn_ranks(_gather_all_cases, world_size, drawn, timeout=120) == [len(drawn)] * world_size
