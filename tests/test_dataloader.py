"""zerostep.runtime.dataloader: DeepSpeed's DeepSpeedDataLoader, RepeatingLoader and make_dataloader."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import IterableDataset, RandomSampler, SequentialSampler, TensorDataset

from zerostep.core import Config
from zerostep.runtime.dataloader import DeepSpeedDataLoader, RepeatingLoader, make_dataloader


def numbered(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n), torch.arange(n) * 10)


def config(mb: int = 3, drop_last: bool = False, seed: int | None = None, world_size: int = 1) -> Config:
    d = {"train_micro_batch_size_per_gpu": mb, "dataloader_drop_last": drop_last}
    if seed is not None:
        d["seed"] = seed
    return Config.from_dict(d, world_size=world_size)


def order(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch[0]]


def test_one_rank_batches_len_and_repeatable_order():
    loader = make_dataloader(numbered(10), config(mb=3), rank=0, world_size=1, num_local_io_workers=0)
    batches = list(loader)
    assert len(loader) == 4 and [len(b[0]) for b in batches] == [3, 3, 3, 1]
    assert all(torch.equal(b[1], b[0] * 10) for b in batches)  # default collate keeps the pairs
    first = order(loader)
    assert sorted(first) == list(range(10)) and first != list(range(10))  # shuffled
    assert order(loader) == first  # every pass repeats the order, as DeepSpeed's (no set_epoch)
    again = make_dataloader(numbered(10), config(mb=3), rank=0, world_size=1, num_local_io_workers=0)
    assert order(again) == first  # no config seed: the sampler's 0, as DeepSpeed
    seeded = make_dataloader(numbered(10), config(mb=3, seed=7), rank=0, world_size=1, num_local_io_workers=0)
    assert order(seeded) != first and sorted(order(seeded)) == list(range(10))
    assert order(
        make_dataloader(numbered(10), config(mb=3), rank=0, world_size=1, seed=7, num_local_io_workers=0)
    ) == order(seeded)
    loader.set_epoch(1)
    assert order(loader) != first and loader.data_sampler.epoch == 1
    assert loader.batch_size == 3 and loader.device_count == 1 and not loader.dataloader_drop_last


def test_drop_last_collate_timer_and_workers():
    starts = []

    class Timer:
        def start(self):
            starts.append(1)

    collate = lambda samples: torch.stack([s[0] for s in samples]).sum()
    loader = make_dataloader(
        numbered(10), config(mb=4, drop_last=True), collate, rank=0, world_size=1, tput_timer=Timer()
    )
    assert loader.num_local_io_workers == 2  # DeepSpeed's 2 per device
    sums = list(loader)
    # started before each fetch, so the timer includes loading; the fetch that ends the pass too (DeepSpeed)
    assert len(loader) == 2 == len(sums) == len(starts) - 1
    assert all(s.dim() == 0 for s in sums) and loader.pin_memory == torch.cuda.is_available()
    assert loader.dataloader is not None and loader.dataloader.num_workers == 2


def test_repeating_loader_restarts():
    loader = make_dataloader(numbered(5), config(mb=2), rank=0, world_size=1, num_local_io_workers=0)
    repeating = RepeatingLoader(loader)
    got = [next(repeating)[0].tolist() for _ in range(7)]
    assert got[:3] == got[3:6] and got[6] == got[0] and iter(repeating) is repeating


@given(
    n=st.integers(1, 40),
    world=st.integers(1, 4),
    mb=st.integers(1, 6),
    drop_last=st.booleans(),
    seed=st.integers(0, 3),
)
def test_ranks_split_the_data_as_distributed_sampler(n, world, mb, drop_last, seed):
    cfg = config(mb=mb, drop_last=drop_last, seed=seed, world_size=world)
    loaders = [
        make_dataloader(numbered(n), cfg, rank=r, world_size=world, num_local_io_workers=0)
        for r in range(world)
    ]
    per_rank = -(-n // world)  # padded: every rank gets ceil(n / world) samples
    expected_len = per_rank // mb if drop_last else -(-per_rank // mb)
    seen = []
    for loader in loaders:
        samples = order(loader)
        assert len(loader) == expected_len == len(list(loader))
        assert len(samples) == (expected_len * mb if drop_last else per_rank)
        seen += samples
    if not drop_last:
        assert set(seen) == set(range(n)) and len(seen) == per_rank * world  # padding repeats samples
    indices = [list(loader.data_sampler) for loader in loaders]
    merged = [i for step in zip(*indices) for i in step]  # DistributedSampler deals round-robin
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    assert merged == (perm * world)[: per_rank * world]


def test_deepspeed_constructor_modes():
    data = numbered(8)
    legacy = DeepSpeedDataLoader(
        data, batch_size=2, pin_memory=False, local_rank=-1, tput_timer=None, num_local_io_workers=0
    )
    assert isinstance(legacy.data_sampler, RandomSampler)  # DeepSpeed's one-process mode
    assert legacy.batch_size == 2 * legacy.device_count
    custom = DeepSpeedDataLoader(
        data,
        batch_size=3,
        pin_memory=False,
        local_rank=0,
        tput_timer=None,
        data_sampler=SequentialSampler(data),
        num_local_io_workers=0,
    )
    assert order(custom) == list(range(8)) and len(custom) == 3
    with pytest.raises(StopIteration):
        next(custom)  # a finished pass stays finished until iter() starts the next one
    fresh = DeepSpeedDataLoader(
        data, 3, False, 0, None, data_sampler=SequentialSampler(data), num_local_io_workers=0
    )
    assert next(fresh)[0].tolist() == [0, 1, 2]  # next() before iter() starts a pass
    with pytest.raises(TypeError, match="set_epoch"):
        custom.set_epoch(1)


def test_bad_inputs_are_named():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(ValueError, match="IterableDataset.*Shard the stream"):
        make_dataloader(Stream(), config(), rank=0, world_size=1)
    with pytest.raises(ValueError, match="Training data must be a torch Dataset"):
        make_dataloader([1, 2, 3].__iter__(), config(), rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size=2\)"):
        make_dataloader(numbered(4), config(), rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        DeepSpeedDataLoader(numbered(4), 0, False, 0, None)
    with pytest.raises(ValueError, match="num_local_io_workers"):
        DeepSpeedDataLoader(numbered(4), 2, False, 0, None, num_local_io_workers=-1)
    with pytest.raises(ValueError, match="curriculum_learning needs its data_efficiency config"):
        DeepSpeedDataLoader(
            numbered(4), 2, False, 0, None, deepspeed_dataloader_config={"curriculum_learning": True}
        )
