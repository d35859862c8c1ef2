"""DeepSpeed's ``deepspeed.moe.layer``: ``MoE`` (defined in ``zerostep.parallel.moe_layer``)."""

from zerostep.parallel.moe_layer import MoE

__all__ = ["MoE"]
