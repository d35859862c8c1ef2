"""DeepSpeed's ``deepspeed.moe``: ``layer.MoE`` and ``utils`` over ``zerostep.parallel.moe_layer``,
``zerostep.parallel.expert`` and ``zerostep.parallel.moe_gate``, where the gating, the groups and the
all-to-all live."""

from zerostep.moe import layer, utils
from zerostep.moe.layer import MoE

__all__ = ["MoE", "layer", "utils"]
