"""DeepSpeed's training data loader: ``DeepSpeedDataLoader``, ``RepeatingLoader`` and ``make_dataloader``.

As DeepSpeed 0.19 (``runtime/dataloader.py``, ``engine.deepspeed_io``), which ``initialize(training_data=)``
builds: a ``DistributedSampler`` over the data-parallel ranks (shuffled, padded so every rank gets
``ceil(len / world)`` samples), micro-batches of ``train_micro_batch_size_per_gpu``, the caller's
``collate_fn``, ``dataloader_drop_last`` for the last short batch, ``2 x devices`` worker processes
unless ``num_local_io_workers`` says otherwise, and a new ``torch.utils.data.DataLoader`` (new workers)
each time iteration starts. ``len()`` is the number of batches of one pass.

The order is a function of the seed: the sampler's shuffle uses the config's ``seed`` (DeepSpeed always
uses the sampler's default, 0, which is also zerostep's when the config has none). Like DeepSpeed's,
every pass repeats the same order unless ``set_epoch(epoch)`` is called (DeepSpeed's users call
``loader.data_sampler.set_epoch``; both work).

With ``data_efficiency.data_sampling.curriculum_learning`` on (DeepSpeed's data-efficiency curriculum),
the loader samples with ``DeepSpeedDataSampler`` (core/data_sampler.py) as a batch sampler, with the
config's ``data_sampling.num_workers``, and hands each batch through ``post_process_func(batch,
sampler.state_dict())`` when one is set (``engine.set_data_post_process_func``), as DeepSpeed does.

Where DeepSpeed fails, zerostep says why: an ``IterableDataset`` has no indices to sample (DeepSpeed
raises from inside torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler


class RepeatingLoader:
    """Iterate ``loader`` forever, starting it again whenever it runs out (DeepSpeed's)."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.data_iter = iter(self.loader)

    def __iter__(self) -> RepeatingLoader:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            return next(self.data_iter)


def check_dataset(dataset: Any) -> None:
    """A map-style dataset (``__getitem__`` and ``__len__``), as DeepSpeed's loader samples indices."""
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"training_data is an IterableDataset ({type(dataset).__name__}): DeepSpeed's loader samples "
            "indices, which a stream does not have. Shard the stream by rank yourself and iterate a "
            "torch.utils.data.DataLoader over it instead of passing it as training_data"
        )
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise ValueError(
            "Training data must be a torch Dataset (with __getitem__ and __len__), "
            f"not {type(dataset).__name__}"
        )


class DeepSpeedDataLoader:
    """DeepSpeed's loader; the constructor takes DeepSpeed's arguments, plus the sampler's ``seed``.

    ``local_rank >= 0`` (a launched job: always, under ``initialize``) samples with a
    ``DistributedSampler`` over ``data_parallel_world_size`` ranks; ``local_rank < 0`` is DeepSpeed's
    legacy one-process mode: a ``RandomSampler`` and ``batch_size`` times the device count.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        pin_memory: bool,
        local_rank: int,
        tput_timer: Any,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_local_io_workers: int | None = None,
        data_sampler: Sampler | None = None,
        data_parallel_world_size: int | None = None,
        data_parallel_rank: int | None = None,
        dataloader_drop_last: bool = False,
        deepspeed_dataloader_config: dict[str, Any] | None = None,
        *,
        seed: int = 0,
    ):
        check_dataset(dataset)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if num_local_io_workers is not None and (
            not isinstance(num_local_io_workers, int) or num_local_io_workers < 0
        ):
            raise ValueError(f"num_local_io_workers={num_local_io_workers!r} must be an integer >= 0")
        self.deepspeed_dataloader_config = dict(deepspeed_dataloader_config or {})
        self.curriculum_learning_enabled = bool(self.deepspeed_dataloader_config.get("curriculum_learning"))
        self.tput_timer = tput_timer
        if self.curriculum_learning_enabled:
            data_sampler, num_local_io_workers = self._curriculum_sampler(
                dataset, batch_size, data_parallel_rank, data_parallel_world_size, dataloader_drop_last
            )
            device_count = 1
        elif local_rank >= 0:
            if data_sampler is None:
                data_sampler = DistributedSampler(
                    dataset, num_replicas=data_parallel_world_size, rank=data_parallel_rank, seed=seed
                )
            device_count = 1
        else:
            from zerostep.accelerator import get_accelerator

            if data_sampler is None:
                data_sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
            device_count = get_accelerator().device_count()
            batch_size *= device_count
        self.num_local_io_workers = 2 * device_count if num_local_io_workers is None else num_local_io_workers
        self.data_sampler = data_sampler
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.device_count = device_count
        self.batch_size = batch_size
        self.pin_memory = pin_memory
        self.dataloader_drop_last = dataloader_drop_last
        self.post_process_func: Callable[[Any, dict], Any] | None = None  # curriculum batches only
        self.dataloader: DataLoader | None = None
        self.data: Iterator[Any] | None = None
        samples = len(self.data_sampler)
        self.len = samples // batch_size if dataloader_drop_last else math.ceil(samples / batch_size)
        if self.curriculum_learning_enabled:
            self.len = samples  # the curriculum sampler's len() counts this rank's micro-batches

    def _curriculum_sampler(
        self, dataset: Any, batch_size: int, rank: int | None, world: int | None, drop_last: bool
    ) -> tuple[Sampler, int]:
        from zerostep.core.data_sampler import DeepSpeedDataSampler

        c = self.deepspeed_dataloader_config
        if c.get("data_efficiency") is None:
            raise ValueError(
                "deepspeed_dataloader_config with curriculum_learning needs its data_efficiency config "
                "(the Config's data_efficiency, or DeepSpeed's data_efficiency dict)"
            )
        sampler = DeepSpeedDataSampler(
            c["data_efficiency"],
            len(dataset),
            batch_size,
            0 if rank is None else rank,
            1 if world is None else world,
            c.get("data_parallel_group"),
            c.get("gradient_accumulation_steps", 1),
            c.get("global_rank", 0),
            drop_last=drop_last,
        )
        return sampler, int(c.get("num_workers", 0))

    def __len__(self) -> int:
        return self.len

    def __iter__(self) -> DeepSpeedDataLoader:
        self._create_dataloader()
        return self

    def __next__(self) -> Any:
        if self.data is None:
            self._create_dataloader()  # next() before iter(), as DeepSpeed's engine never does
        if self.tput_timer:
            self.tput_timer.start()
        data = next(self.data)
        if self.curriculum_learning_enabled and self.post_process_func is not None:
            data = self.post_process_func(data, self.data_sampler.state_dict())
        return data

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` from the next pass on (the sampler's ``set_epoch``)."""
        if not hasattr(self.data_sampler, "set_epoch"):
            raise TypeError(f"the data sampler ({type(self.data_sampler).__name__}) has no set_epoch")
        self.data_sampler.set_epoch(epoch)

    def _create_dataloader(self) -> DataLoader:
        kwargs: dict[str, Any] = {}
        if self.collate_fn is not None:
            kwargs["collate_fn"] = self.collate_fn
        if self.curriculum_learning_enabled:  # the sampler yields whole micro-batches of indices
            kwargs["batch_sampler"] = self.data_sampler
        else:
            kwargs.update(
                batch_size=self.batch_size, sampler=self.data_sampler, drop_last=self.dataloader_drop_last
            )
        self.dataloader = DataLoader(
            self.dataset, pin_memory=self.pin_memory, num_workers=self.num_local_io_workers, **kwargs
        )
        self.data = iter(self.dataloader)
        return self.dataloader


def make_dataloader(
    dataset: Any,
    config: Any,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    *,
    rank: int,
    world_size: int,
    seed: int | None = None,
    local_rank: int = 0,
    pin_memory: bool | None = None,
    num_local_io_workers: int | None = None,
    data_sampler: Sampler | None = None,
    tput_timer: Any = None,
    curriculum: bool = True,
) -> DeepSpeedDataLoader:
    """The loader ``initialize(training_data=dataset)`` returns (DeepSpeed's ``engine.deepspeed_io``).

    ``config``: a ``zerostep.core.Config`` (``train_micro_batch_size_per_gpu``, ``dataloader_drop_last``,
    ``seed``). ``rank`` / ``world_size``: the data-parallel rank and size. ``seed``: None takes
    ``config.seed``, else 0. ``pin_memory``: None pins when CUDA is available (DeepSpeed always asks
    to pin; without a GPU torch warns and pins nothing). ``curriculum``: False keeps the ordinary sampler
    even when the config's data-sampling curriculum is on (DeepSpeed's eval and predict loaders).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if seed is None:
        seed = getattr(config, "seed", None)
        seed = 0 if seed is None else seed
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    loader_config = None
    efficiency = getattr(config, "data_efficiency", None)
    if curriculum and efficiency is not None and efficiency.data_sampling.curriculum_learning.enabled:
        if data_sampler is not None:
            raise ValueError(
                "deepspeed_io(data_sampler=...) with data_efficiency.data_sampling.curriculum_learning on: "
                "the curriculum's DeepSpeedDataSampler decides the order; pass no sampler"
            )
        loader_config = {
            "curriculum_learning": True,
            "data_efficiency": efficiency,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            # the cluster files' writer: one process of the job, not one per pipeline stage
            "global_rank": torch.distributed.get_rank() if torch.distributed.is_initialized() else rank,
            "num_workers": efficiency.data_sampling.num_workers,
        }
    return DeepSpeedDataLoader(
        dataset,
        batch_size=config.train_micro_batch_size_per_gpu,
        pin_memory=pin_memory,
        local_rank=max(local_rank, 0),
        tput_timer=tput_timer,
        collate_fn=collate_fn,
        num_local_io_workers=num_local_io_workers,
        data_sampler=data_sampler,
        data_parallel_world_size=world_size,
        data_parallel_rank=rank,
        dataloader_drop_last=config.dataloader_drop_last,
        deepspeed_dataloader_config=loader_config,
        seed=seed,
    )
