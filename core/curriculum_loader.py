"""The data-efficiency curriculum for the functional API: a loader of whole optimizer steps.

``zerostep.core``'s ``engine.step(state, batch)`` takes this rank's ``micro x gas`` samples at once, so
this loader groups the sampler's micro-batches by global batch (``StepBatchSampler``)::

    engine = zerostep.core.initialize(model, "ds_config.json", loss_fn=loss_fn)
    loader = curriculum_loader(dataset, engine, post_process_func=truncate)   # the config's curriculum
    state = engine.init(seed=0)
    for batch in loader:                    # post_process_func(batch, loader.state_dict()) applied
        state = engine.step(state, batch)
    engine.save(state, "ckpt", client_state={"data_sampler": loader.state_dict()})
    state, client = engine.load("ckpt", return_client_state=True)
    loader.load_state_dict(client["data_sampler"])    # the next batch is the one after the checkpoint

The difficulty is constant within a global batch, so the post-process function sees one state per
step; the loader's ``data_sampler`` is the ``DeepSpeedDataSampler`` (``current_difficulties``,
``set_custom_curriculum_learning_schedule``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from zerostep.core.data_sampler import DeepSpeedDataSampler, StepBatchSampler


class CurriculumLoader:
    """Iterating yields this rank's collated batch of each optimizer step, post-processed."""

    def __init__(
        self,
        dataset: Any,
        config: Any,
        *,
        rank: int,
        world_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        post_process_func: Callable[[Any, dict], Any] | None = None,
        num_workers: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        sampling = config.data_efficiency.data_sampling
        self.data_sampler = DeepSpeedDataSampler(
            config.data_efficiency,
            len(dataset),
            config.train_micro_batch_size_per_gpu,
            rank,
            world_size,
            None,
            config.gradient_accumulation_steps,
            rank,
        )
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.post_process_func = post_process_func
        self.num_workers = sampling.num_workers if num_workers is None else num_workers
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(StepBatchSampler(self.data_sampler))

    def __iter__(self) -> Iterator[Any]:
        kwargs = {} if self.collate_fn is None else {"collate_fn": self.collate_fn}
        loader = DataLoader(
            self.dataset,
            batch_sampler=StepBatchSampler(self.data_sampler),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **kwargs,
        )
        for data in loader:
            if self.post_process_func is not None:
                data = self.post_process_func(data, self.data_sampler.state_dict())
            yield data

    def state_dict(self) -> dict[str, Any]:
        return self.data_sampler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.data_sampler.load_state_dict(state_dict)


def curriculum_loader(
    dataset: Any,
    engine_or_config: Any,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    **kwargs: Any,
) -> CurriculumLoader:
    """A ``CurriculumLoader`` for ``zerostep.core.initialize``'s engine (its config, rank and world size)
    or for a ``Config`` with an explicit ``rank`` and ``world_size``. ``kwargs``: ``collate_fn``,
    ``post_process_func``, ``num_workers`` (default: ``data_sampling.num_workers``), ``pin_memory``."""
    config = getattr(engine_or_config, "config", engine_or_config)
    if rank is None:
        rank = int(getattr(engine_or_config, "rank", 0))
    if world_size is None:
        world_size = int(getattr(engine_or_config, "world_size", 1))
    if not config.data_efficiency.data_sampling.curriculum_learning.enabled:
        raise ValueError(
            "curriculum_loader: the config has no data_efficiency.data_sampling.curriculum_learning "
            "enabled; use an ordinary DataLoader"
        )
    return CurriculumLoader(dataset, config, rank=rank, world_size=world_size, **kwargs)
