"""DeepSpeed's ``deepspeed.profiling``: the FLOPs profiler (``zerostep.profiling.flops_profiler``)."""
