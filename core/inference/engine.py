"""The inference engine: the user's module prepared once (weights, shards, dtype, int8, device, compile),
then called like the module.

Order of preparation: with ``checkpoint`` the source is opened and checked against the module's full
names and shapes (another model's checkpoint fails before any work); the module is sharded over the
ranks when ``tp_size > 1`` (``tensor_parallel.py``; a module built on the meta device or under
``zerostep.zero.Init`` shards without memory); each rank reads just its shards from the checkpoint
(``loading.py``); the module is cast to ``dtype``, moved to the accelerator (CUDA when present, unless
``keep_module_on_host``), its linears quantized to int8 per output channel of each shard when asked,
and put in eval mode. DeepSpeed's "kernel injection" is, in zerostep's terms, the module's forward
compiled in place with ``torch.compile`` (``nn.Module.compile``), so the module's own ``generate``
decodes through the compiled forward too, with Hugging Face's static cache where the model supports it;
zerostep's GPT generates through a static KV cache with its decode step compiled once
(``static_cache.py``). ``enable_cuda_graph`` compiles with ``mode="reduce-overhead"`` (CUDA graphs) on
CUDA, and warns off CUDA.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zerostep.core.inference import loading
from zerostep.core.inference.config import InferenceConfig
from zerostep.core.inference.quantize import quantize_linears
from zerostep.core.inference.static_cache import StaticCacheGenerator, hf_static_cache_kwargs, supports
from zerostep.core.inference.tensor_parallel import apply_tensor_parallel, checked_plan

# torch.compile's backend for the forward and the decode step; tests swap in "eager" (dynamo's graphs
# and guards without inductor's code generation, which costs ~10 s per graph on this machine)
COMPILE_BACKEND = "inductor"


def _device(config: InferenceConfig) -> torch.device | None:
    if config.keep_module_on_host or not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device())


def _compile_mode(config: InferenceConfig, on_cuda: bool) -> str | None:
    """The ``torch.compile`` mode, or None for an eager forward."""
    if config.enable_cuda_graph:
        if on_cuda:
            return "reduce-overhead"
        warnings.warn(
            "init_inference: enable_cuda_graph has no effect off CUDA; the forward is compiled with "
            "torch.compile (default mode) instead",
            stacklevel=4,
        )
        return "default"
    if config.kernel_inject:
        warnings.warn(
            "init_inference: replace_with_kernel_inject: zerostep has no DeepSpeed kernels; the module's "
            "forward is compiled with torch.compile instead",
            stacklevel=4,
        )
        return "default"
    return None


def _prompt_length(args: tuple, kwargs: dict) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.dim() >= 1 else None


class InferenceEngine(nn.Module):
    """DeepSpeed's ``InferenceEngine``: ``engine(*a, **kw)`` is the module's forward (without autograd),
    ``engine.module`` the prepared module, ``engine.generate`` the module's own ``generate`` where it
    has one (zerostep's GPT: ``StaticCacheGenerator.generate``, the same contract through a KV cache)."""

    def __init__(self, model: nn.Module, config: InferenceConfig):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"init_inference: model must be a torch.nn.Module, got {type(model).__name__}")
        if config.tp_size > 1:
            checked_plan(model, config.tp_size, config.injection_policy)  # a bad tp_size fails first
        self._config = config
        self.module = model
        self.tp_specs = self._load_and_shard(model, config)
        if config.dtype != torch.int8:  # int8: weight-only, computing in the module's own dtype
            model.to(config.dtype)
        device = _device(config)
        if device is not None:
            model.to(device)
        self.quantized_linears = quantize_linears(model) if config.int8_weights else 0
        model.eval()
        model.requires_grad_(False)
        on_cuda = any(p.is_cuda for p in model.parameters()) or any(b.is_cuda for b in model.buffers())
        self.compile_mode = _compile_mode(config, on_cuda)
        if self.compile_mode is not None:
            model.compile(mode=self.compile_mode, backend=COMPILE_BACKEND)  # in place: generate uses it
        # zerostep's GPT: a static KV cache, the decode step compiled once when the forward is
        self.static_cache = (
            StaticCacheGenerator(model, config.max_out_tokens, self.compile_mode, COMPILE_BACKEND)
            if supports(model)
            else None
        )
        if self.static_cache is not None:
            self.generate = self.static_cache.generate
        elif hasattr(model, "generate"):
            self.generate = self._generate

    @staticmethod
    def _load_and_shard(model: nn.Module, config: InferenceConfig) -> dict | None:
        """Weights (each rank reading only its shards) and tensor parallelism; name -> ShardSpec, or
        None without tensor parallelism."""
        groups = loading.alias_groups(model)
        source = None if config.checkpoint is None else loading.open_weights(config.checkpoint)
        try:
            if source is not None:
                loading.check_matches(source, loading.full_shapes(model), groups)
            else:
                loading.materialize_parameters(model)  # a zero.Init model without checkpoint: whole
            loading.materialize_buffers(model)
            specs = None
            if config.tp_size > 1:
                specs = apply_tensor_parallel(model, config.tp_size, config.injection_policy)
            if source is not None:
                loading.load_weights(model, source, groups, specs, dist.get_rank() if specs else 0)
            return specs
        finally:
            if source is not None:
                source.close()

    @property
    def config(self) -> InferenceConfig:
        return self._config

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*inputs, **kwargs)

    def _generate(self, *inputs: Any, **kwargs: Any) -> Any:
        length = _prompt_length(inputs, kwargs)
        if length is not None and length > self._config.max_out_tokens:
            raise RuntimeError(
                f"init_inference: input of length {length} exceeds "
                f"max_out_tokens={self._config.max_out_tokens}; "
                "raise max_out_tokens (max_tokens) in the inference config"
            )
        if hasattr(self.module, "reset_cache"):
            self.module.reset_cache()
        if self.compile_mode is not None and hasattr(self.module, "generation_config"):
            kwargs = hf_static_cache_kwargs(self.module, kwargs)
        with torch.no_grad():
            return self.module.generate(*inputs, **kwargs)
