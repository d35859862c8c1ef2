"""The data-efficiency curriculum's part of ``DeepSpeedEngine``'s surface (DeepSpeed 0.19's names).

``deepspeed_io`` builds the curriculum loader (zerostep/runtime/dataloader.py); these methods reach its
``DeepSpeedDataSampler`` (core/data_sampler.py): the post-process function applied to each batch with
the sampler's state (``state["current_difficulties"][metric]``, what Megatron-DeepSpeed truncates
sequences with), custom schedules, and the config's switches. Checkpoints carry the sampler's state
(zerostep/runtime/checkpoint.py), as DeepSpeed's ``data_sampler`` entry does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class DataSamplingMethods:
    """Mixed into ``DeepSpeedEngine``: needs ``self._core.config`` and ``self.training_dataloader``."""

    def data_efficiency_enabled(self) -> bool:
        return self._core.config.data_efficiency.enabled

    def data_efficiency_config(self) -> Any:
        return self._core.config.data_efficiency

    def data_sampling_enabled(self) -> bool:
        return self._core.config.data_efficiency.data_sampling.enabled

    def data_sampling_config(self) -> Any:
        return self._core.config.data_efficiency.data_sampling

    def curriculum_learning_enabled(self) -> bool:
        """Whether the data-sampling curriculum is on (not the legacy top-level ``curriculum_learning``)."""
        return self._core.config.data_efficiency.data_sampling.curriculum_learning.enabled

    def curriculum_learning_config(self) -> Any:
        return self._core.config.data_efficiency.data_sampling.curriculum_learning

    def curriculum_data_sampler(self) -> Any:
        """The training loader's ``DeepSpeedDataSampler``, or None (no curriculum, or no loader yet)."""
        loader = self.training_dataloader
        if loader is None or not getattr(loader, "curriculum_learning_enabled", False):
            return None
        return loader.data_sampler

    def set_data_post_process_func(self, post_process_func: Callable[[Any, dict], Any]) -> None:
        """``fn(batch, sampler_state) -> batch`` on every training batch of the curriculum loader (DeepSpeed
        sets it on any training loader, whose non-curriculum batches never call it)."""
        if not callable(post_process_func):
            raise TypeError(f"set_data_post_process_func: {post_process_func!r} is not callable")
        if self.training_dataloader is None:
            raise RuntimeError(
                "set_data_post_process_func: the engine has no training loader; pass training_data to "
                "initialize or call engine.deepspeed_io(dataset) first"
            )
        self.training_dataloader.post_process_func = post_process_func

    def set_custom_curriculum_learning_schedule(self, schedule_func_dict: Mapping[str, Callable]) -> None:
        """``{metric: fn(curriculum_step) -> difficulty}`` for the metrics of ``schedule_type`` custom."""
        sampler = self.curriculum_data_sampler()
        if sampler is None:
            raise RuntimeError(
                "set_custom_curriculum_learning_schedule: no curriculum loader (enable "
                "data_efficiency.data_sampling.curriculum_learning and pass training_data)"
            )
        sampler.set_custom_curriculum_learning_schedule(schedule_func_dict)
