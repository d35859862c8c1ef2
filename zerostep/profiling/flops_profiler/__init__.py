"""DeepSpeed's ``deepspeed.profiling.flops_profiler`` names over ``core/monitoring/flops_profiler.py``
(counts from ``torch.utils.flop_counter.FlopCounterMode``).

    from zerostep.profiling.flops_profiler import FlopsProfiler, get_model_profile
    flops, macs, params = get_model_profile(model, input_shape=(8, 512), as_string=False)
"""

from zerostep.core.monitoring.flops_profiler import (
    FlopsProfiler,
    ModuleProfile,
    duration_to_string,
    flops_to_string,
    get_model_profile,
    macs_to_string,
    number_to_string,
    params_to_string,
)

__all__ = [
    "FlopsProfiler",
    "ModuleProfile",
    "duration_to_string",
    "flops_to_string",
    "get_model_profile",
    "macs_to_string",
    "number_to_string",
    "params_to_string",
]
