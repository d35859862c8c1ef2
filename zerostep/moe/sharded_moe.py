"""DeepSpeed's ``deepspeed.moe.sharded_moe`` names (the machinery is in ``zerostep.parallel``)."""

from zerostep.parallel.expert import MOELayer
from zerostep.parallel.moe_gate import TopKGate, top1_routes, top2_routes, topk_routes

__all__ = ["MOELayer", "TopKGate", "top1_routes", "top2_routes", "topk_routes"]
