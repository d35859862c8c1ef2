"""The hybrid engine (``hybrid_engine.enabled``): one engine that trains and generates with the same weights.

DeepSpeed-Chat's PPO step generates answers with the actor it trains: ``engine.generate(...)`` (or
``engine.module.generate(...)``, which DeepSpeed's hybrid engine reroutes too) between training steps.
There is no second copy of the weights: the module's own ``generate`` runs on the engine's current
parameters, in eval mode (dropout off) under ``torch.no_grad``, and the module's training mode is put back
afterwards.

- Stages 0-2: the module's parameters already are views of the state's compute-dtype buffers
  (core/module_binding.py), so generation reads the live weights (after waiting for parameter
  all-gathers still in flight, ``overlap_param_gather``).
- Stage 3, ``pin_parameters: true`` (DeepSpeed's default): the whole model is gathered into the module
  once per call (``module_binding.gather_released``, as ``zerostep.zero.GatheredParameters``) and
  released to its placeholders when the call returns, so the full weights live only during generation.
- Stage 3, ``pin_parameters: false``: the module runs under the ZeRO-3 runner's hooks
  (``parallel.zero3``), which gather each block for each forward of the decoding loop and free it after:
  peak memory one block (plus the root unit) instead of the model, at one gather per block per token.

The other keys: ``max_out_tokens`` bounds prompt + new tokens per call (a ValueError before generating
when the call asks for more; a warning when the call's arguments do not say how many); with
``release_inference_cache`` the memory the call cached (KV caches and activations held by the device's
caching allocator) is returned after it (``gc.collect`` and ``empty_cache``). ``inference_tp_size > 1``
regroups the ranks into inference tensor-parallel groups and generates on the weights split over them
(core/hybrid_tp.py; at stage 3 the whole model is gathered once per call to cut the shards, so
``pin_parameters`` and ``tp_gather_partition_size`` have no effect there and say so);
``enable_cuda_graph`` has no effect and says so, as ``pin_parameters`` does below stage 3. As in
DeepSpeed, the ranks' random generators are made equal once (rank 0's), so that sampling agrees.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from zerostep.core.autocast import under_autocast
from zerostep.core.module_binding import gather_released, release_gathered
from zerostep.core.state import TrainState


class HybridEngine:
    """Generation on an engine's live weights (module docstring). Built by ``HybridEngine.of``."""

    def __init__(self, core: Any, state_of: Callable[[], TrainState]) -> None:
        self.core = core
        self.settings = core.config.hybrid_engine
        self._state_of = state_of
        self._generate = core.model.generate  # the module's own, bound before it is rerouted
        self._warned_unknown_length = False
        self.last_peak_gathered_bytes = 0  # stage 3, pin_parameters false: the runner's high-water mark
        self.tensor_parallel = None  # inference_tp_size > 1: core/hybrid_tp.py
        if self.settings.inference_tp_size > 1:
            from zerostep.core.hybrid_tp import TensorParallelGeneration

            tp = self.settings.inference_tp_size
            self.tensor_parallel = TensorParallelGeneration(core, self._generate, tp)

    @staticmethod
    def of(core: Any, state_of: Callable[[], TrainState]) -> HybridEngine | None:
        """The hybrid engine of ``core`` when ``hybrid_engine.enabled``, else None. ``state_of()``: the
        engine's live state. Reroutes ``core.model.generate`` through it, as DeepSpeed does."""
        settings = core.config.hybrid_engine
        if not settings.enabled:
            return None
        model = core.model
        if not callable(getattr(model, "generate", None)):
            raise ValueError(
                f"hybrid_engine.enabled: {type(model).__name__} has no generate() method; the hybrid "
                "engine calls the module's own generate (a Hugging Face model's, or one you define)"
            )
        _warn_no_effect(core)
        _sync_rng(core)
        engine = HybridEngine(core, state_of)
        model.generate = _rerouted(weakref.ref(engine))
        return engine

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The module's ``generate(*args, **kwargs)`` on the current weights (every rank calls it at
        stage 3, whose gathers are collectives)."""
        core = self.core
        self._check_length(args, kwargs)
        state = self._state_of()
        flats = state.params.flats  # waits for parameter all-gathers still in flight (stages 1-2)
        model = core.model
        was_training = model.training
        model.eval()
        call = under_autocast(self._generate, core.autocast)  # torch_autocast, as in the forward
        try:
            with torch.no_grad():
                if self.tensor_parallel is not None:
                    self.tensor_parallel.skeleton.eval()
                    wrap = lambda f: under_autocast(f, core.autocast)  # noqa: E731
                    return self.tensor_parallel.generate(args, kwargs, wrap)
                if core.plan.stage < 3:
                    return call(*args, **kwargs)
                if self.settings.pin_parameters:
                    with _gathered(list(model.parameters())):
                        return call(*args, **kwargs)
                with core._runner.session(flats, track_grads=False) as session:
                    try:
                        return session.run(lambda module: call(*args, **kwargs))
                    finally:
                        self.last_peak_gathered_bytes = session.tracker.peak
        finally:
            model.train(was_training)
            if self.settings.release_inference_cache:
                _release_cache(core.device)

    def _check_length(self, args: tuple, kwargs: dict) -> None:
        """``max_out_tokens``: prompt + new tokens this call asks for, refused above the bound."""
        bound = self.settings.max_out_tokens
        wanted = requested_length(self._generate, args, kwargs, self.core.model)
        if wanted is None:
            if not self._warned_unknown_length:
                self._warned_unknown_length = True
                warnings.warn(
                    "hybrid_engine.max_out_tokens is not checked for this generate call: its arguments "
                    "name no prompt length with max_new_tokens / new_tokens, nor max_length",
                    stacklevel=4,
                )
            return
        if wanted > bound:
            raise ValueError(
                f"generate asks for up to {wanted} tokens (prompt and new ones), more than "
                f"hybrid_engine.max_out_tokens = {bound}; raise max_out_tokens or ask for fewer"
            )


def requested_length(
    generate: Callable[..., Any], args: tuple, kwargs: dict, module: torch.nn.Module
) -> int | None:
    """Prompt + new tokens a ``generate`` call asks for, from its arguments (Hugging Face's
    ``max_new_tokens`` / ``max_length`` / ``generation_config``, zerostep GPT's ``new_tokens``), or None
    when they do not say."""
    try:
        bound = inspect.signature(generate).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    prompt = next(
        (named[k] for k in ("input_ids", "inputs", "prompt") if isinstance(named.get(k), torch.Tensor)),
        next((v for v in named.values() if isinstance(v, torch.Tensor)), None),
    )
    new, total = named.get("max_new_tokens", named.get("new_tokens")), named.get("max_length")
    if new is None and total is None:
        config = named.get("generation_config") or getattr(module, "generation_config", None)
        new, total = getattr(config, "max_new_tokens", None), getattr(config, "max_length", None)
    if new is not None and prompt is not None:
        return int(prompt.shape[-1]) + int(new)
    return int(total) if total is not None else None


def _rerouted(engine_ref: weakref.ref) -> Callable[..., Any]:
    def generate(*args: Any, **kwargs: Any) -> Any:
        engine = engine_ref()
        if engine is None:
            raise RuntimeError("the hybrid engine this module's generate belonged to is gone")
        return engine.generate(*args, **kwargs)

    return generate


@contextlib.contextmanager
def _gathered(params: list[torch.Tensor]) -> Any:
    """Stage-3 placeholders filled with their full values inside the block, released after."""
    filled = gather_released(params)
    try:
        yield
    finally:
        release_gathered(filled, None)


def _release_cache(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _warn_no_effect(core: Any) -> None:
    settings = core.config.hybrid_engine
    notes = []
    tp = settings.inference_tp_size > 1
    if core.plan.stage < 3 and not settings.pin_parameters:
        notes.append(
            "pin_parameters = false has no effect below ZeRO stage 3 (the module's parameters are always "
            "whole)"
        )
    if settings.tp_gather_partition_size != 8:
        notes.append(
            "tp_gather_partition_size has no effect ("
            + (
                "zerostep gathers the whole model once per call to cut the inference shards)"
                if tp
                else "it applies to inference_tp_size > 1)"
            )
        )
    if tp and core.plan.stage == 3 and not settings.pin_parameters:
        notes.append(
            "pin_parameters = false has no effect with inference_tp_size > 1 (the whole model is "
            "gathered once per call to cut the inference shards, then released)"
        )
    if settings.enable_cuda_graph:
        notes.append(
            "enable_cuda_graph has no effect (zerostep does not capture decode steps as CUDA graphs)"
        )
    for note in notes:
        warnings.warn(f"hybrid_engine.{note}", stacklevel=5)


def _sync_rng(core: Any) -> None:
    """Rank 0's random generators on every rank, once (DeepSpeed's hybrid engine does the same)."""
    if core.world_size == 1:
        return
    src = dist.get_global_rank(core.group, 0) if core.group is not None else 0
    cpu = torch.get_rng_state().to(core.device)  # NCCL broadcasts device tensors only
    dist.broadcast(cpu, src=src, group=core.group)
    torch.set_rng_state(cpu.cpu())
    if core.device.type == "cuda":
        state = torch.cuda.get_rng_state(core.device).to(core.device)
        dist.broadcast(state, src=src, group=core.group)
        torch.cuda.set_rng_state(state.cpu(), core.device)
