"""DeepSpeed's ``deepspeed.moe.experts.Experts`` (defined in ``zerostep.parallel.expert``)."""

from zerostep.parallel.expert import Experts

__all__ = ["Experts"]
