"""The ``hybrid_engine`` block (DeepSpeed 0.19's ``HybridEngineConfig``: keys and defaults).

One engine that trains and generates with the same weights (DeepSpeed-Chat's RLHF actor). What each key
does in zerostep is decided in ``core/hybrid_engine.py`` (``inference_tp_size > 1``: core/hybrid_tp.py,
which checks it against the world size); here only the values are checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from zerostep.core.config.values import Block, boolean, positive_int


@dataclass(frozen=True)
class HybridEngineConfig:
    enabled: bool = False
    max_out_tokens: int = 512  # prompt + generated tokens one generate call may reach
    inference_tp_size: int = 1
    release_inference_cache: bool = False  # return the generation's cached memory after each call
    pin_parameters: bool = True  # stage 3: gather the whole model once per call (else unit by unit)
    tp_gather_partition_size: int = 8  # layers gathered at once for inference_tp_size > 1
    enable_cuda_graph: bool = False  # DeepSpeed's decode-step CUDA graphs


def parse_hybrid_engine(block: Block | None) -> HybridEngineConfig:
    if block is None:
        return HybridEngineConfig()
    d = HybridEngineConfig()
    config = HybridEngineConfig(
        enabled=block.take("enabled", d.enabled, boolean),
        max_out_tokens=block.take("max_out_tokens", d.max_out_tokens, positive_int),
        inference_tp_size=block.take("inference_tp_size", d.inference_tp_size, positive_int),
        release_inference_cache=block.take("release_inference_cache", d.release_inference_cache, boolean),
        pin_parameters=block.take("pin_parameters", d.pin_parameters, boolean),
        tp_gather_partition_size=block.take(
            "tp_gather_partition_size", d.tp_gather_partition_size, positive_int
        ),
        enable_cuda_graph=block.take("enable_cuda_graph", d.enable_cuda_graph, boolean),
    )
    block.finish()
    return config
