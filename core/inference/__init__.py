"""Inference: ``init_inference``'s machinery (config, shard-by-shard checkpoint loading, int8 weights, the
static KV cache and compiled decode, the engine)."""

from __future__ import annotations

from typing import Any

from torch import nn

from zerostep.core.inference.config import InferenceConfig, parse
from zerostep.core.inference.engine import InferenceEngine
from zerostep.core.inference.quantize import Int8Linear, quantize_linears


def init_inference(model: nn.Module, config: Any = None, **kwargs: Any) -> InferenceEngine:
    """DeepSpeed's ``deepspeed.init_inference``: ``config`` (dict or JSON path) merged with ``kwargs``."""
    return InferenceEngine(model, parse(config, **kwargs))


__all__ = ["InferenceConfig", "InferenceEngine", "Int8Linear", "init_inference", "parse", "quantize_linears"]
