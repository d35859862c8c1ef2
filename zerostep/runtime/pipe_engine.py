"""DeepSpeed's ``PipelineEngine`` facade over ``zerostep.core.pipeline_engine.PipelineEngine``.

``zerostep.initialize(model=PipelineModule, ...)`` returns it. ``train_batch(data_iter=None)`` pulls
``gradient_accumulation_steps`` micro-batches ``(inputs, labels)`` from the iterator (on the first and
last stages only, as DeepSpeed: middle stages read nothing), runs one optimizer step and returns the
mean loss on every rank. ``eval_batch`` does the forward pass only. As in DeepSpeed, ``forward``,
``backward`` and ``step`` are not available in pipeline mode.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from zerostep.core.pipeline_engine import PipelineEngine as CorePipelineEngine
from zerostep.core.state import TrainState
from zerostep.runtime.data_pipeline.data_sampling.engine_api import DataSamplingMethods


class PipelineError(RuntimeError):
    """A call DeepSpeed's pipeline engine does not allow (``forward``/``backward``/``step``)."""


def _concat(parts: list[Any]) -> Any:
    """Micro-batches (tensors or tuples of tensors) joined along dim 0."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return tuple(_concat([p[i] for p in parts]) for i in range(len(first)))
    raise TypeError(f"a micro-batch part must be a tensor or a tuple of tensors, got {type(first).__name__}")


class PipelineEngine(DataSamplingMethods):
    def __init__(self, core: CorePipelineEngine, state: TrainState) -> None:
        self._core, self.state = core, state
        self.module = core.module
        self.data_iterator: Any = None
        self.training_dataloader: Any = None

    # ------------------------------------------------------------------ DeepSpeed's queries

    def is_first_stage(self) -> bool:
        return self._core.is_first

    def is_last_stage(self) -> bool:
        return self._core.is_last

    @property
    def stage_id(self) -> int:
        return self._core.mesh.stage_id

    @property
    def num_stages(self) -> int:
        return self._core.mesh.num_stages

    @property
    def micro_batches(self) -> int:
        return self._core.plan.accumulation_steps

    @property
    def global_steps(self) -> int:
        return int(self.state.step)

    def gradient_accumulation_steps(self) -> int:
        return self._core.plan.accumulation_steps

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._core.plan.micro_batch_size

    def train_batch_size(self) -> int:
        return int(self._core.config.train_batch_size)

    def get_lr(self) -> list[float]:
        return [float(self.state.metrics.lr)]

    def set_dataiterator(self, iterator: Any) -> None:
        self.data_iterator = iterator

    def deepspeed_io(self, dataset: Any, collate_fn: Any = None, **kwargs: Any) -> Any:
        from zerostep.runtime.dataloader import RepeatingLoader, make_dataloader

        mesh = self._core.mesh
        loader = make_dataloader(
            dataset, self._core.config, collate_fn, rank=mesh.dp_rank, world_size=mesh.dp_size
        )
        self.training_dataloader = loader
        self.set_dataiterator(iter(RepeatingLoader(loader)))
        return loader

    # ------------------------------------------------------------------ training

    def _next_batch(self, data_iter: Any, what: str) -> tuple[Any, Any]:
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        core = self._core
        if not (core.is_first or core.is_last):
            return None, None  # a middle stage receives its inputs from the previous stage
        if self.data_iterator is None:
            raise ValueError(f"{what}: no data; pass data_iter= or initialize(training_data=...)")
        parts = []
        for _ in range(core.plan.accumulation_steps):
            micro = next(self.data_iterator)
            if not isinstance(micro, (tuple, list)) or len(micro) != 2:
                raise ValueError(
                    f"{what}: each micro-batch must be (inputs, labels), got {type(micro).__name__}"
                )
            parts.append(micro)
        inputs = _concat([p[0] for p in parts]) if core.is_first else None
        labels = _concat([p[1] for p in parts]) if core.is_last else None
        return inputs, labels

    def train_batch(self, data_iter: Any = None) -> torch.Tensor:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; the mean loss."""
        batch = self._next_batch(data_iter, "train_batch")
        self.module.train()
        self.state = self._core.step(self.state, batch)
        return self.state.metrics.loss

    def eval_batch(
        self, data_iter: Any, return_logits: bool = False, compute_loss: bool = True, **kwargs: Any
    ) -> Any:
        """The mean loss over ``gradient_accumulation_steps`` micro-batches (and the last stage's logits)."""
        if not compute_loss:
            raise NotImplementedError("eval_batch(compute_loss=False) is not implemented")
        if kwargs:
            raise NotImplementedError(f"eval_batch: {sorted(kwargs)} not implemented")
        iterator = self.data_iterator
        batch = self._next_batch(data_iter, "eval_batch")
        self.data_iterator = iterator  # evaluation does not replace the training iterator
        return self._core.eval_step(self.state, batch, return_logits=return_logits)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise PipelineError("Only train_batch() is accessible in pipeline mode.")

    __call__ = forward

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        raise PipelineError("Only train_batch() is accessible in pipeline mode.")

    def step(self, *args: Any, **kwargs: Any) -> Any:
        raise PipelineError("Only train_batch() is accessible in pipeline mode.")

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self,
        save_dir: str | os.PathLike,
        tag: str | None = None,
        client_state: dict | None = None,
        **kwargs: Any,
    ) -> bool:
        if kwargs:
            raise NotImplementedError(f"save_checkpoint: {sorted(kwargs)} not implemented for pipelines")
        self._core.save(self.state, save_dir, tag, client_state)
        return True

    def load_checkpoint(
        self,
        load_dir: str | os.PathLike,
        tag: str | None = None,
        load_optimizer_states: bool = True,
        **kwargs: Any,
    ) -> tuple[str | None, dict]:
        if kwargs:
            raise NotImplementedError(f"load_checkpoint: {sorted(kwargs)} not implemented for pipelines")
        state, client, path = self._core.load(load_dir, tag, load_optimizer_states=load_optimizer_states)
        self.state = state
        return path, client


def build_pipeline(
    model: Any, config_dict: dict, optimizer: Any, model_parameters: Any, lr_scheduler: Any, compile: bool
) -> tuple[Any, None, None]:
    """``zerostep.initialize``'s route for a ``PipelineModule``: (engine, None, None). The optimizer and
    schedule come from the config's blocks (returned as None: the engine steps them itself)."""
    if optimizer is not None or lr_scheduler is not None:
        raise NotImplementedError(
            "initialize(model=PipelineModule, optimizer=/lr_scheduler=...): client optimizers and schedulers "
            "are not implemented with pipeline parallelism; use the config's optimizer and scheduler blocks"
        )
    if model_parameters is not None:
        given = {id(p) for p in model_parameters if isinstance(p, torch.Tensor)}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        if given != trainable:
            raise NotImplementedError(
                "initialize(model=PipelineModule, model_parameters=...): a pipeline trains every parameter "
                "with requires_grad; freeze the others (requires_grad=False) instead of leaving them out"
            )
    core = CorePipelineEngine(model, config_dict, compile=compile)
    state = core.init(seed=int(core.config.seed or 0))
    return PipelineEngine(core, state), None, None
