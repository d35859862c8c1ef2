"""zerostep.ops: DeepSpeed's ``deepspeed.ops`` optimizer classes, as torch optimizers over zerostep's math.

    from zerostep.ops.adam import FusedAdam          # DeepSpeed: from deepspeed.ops.adam import FusedAdam
    opt = FusedAdam(model.parameters(), lr=1e-3, weight_decay=0.01)

- ``adam``: ``FusedAdam``, ``DeepSpeedCPUAdam``; ``lamb``: ``FusedLamb``; ``lion``: ``FusedLion``,
  ``DeepSpeedCPULion``; ``adagrad``: ``DeepSpeedCPUAdagrad``. DeepSpeed's constructor arguments; each
  ``step`` is the ``zerostep.optim`` update of that type (``functional_optimizer``).
- ``spec``: ``zerostep_optimizer_spec(opt, group)``, the ``zerostep.optim`` optimizer (type and keyword
  arguments) a torch optimizer's group amounts to, for ``zerostep.initialize(optimizer=...)``.
"""

from zerostep.ops import adagrad, adam, lamb, lion
from zerostep.ops.spec import zerostep_optimizer_spec

__all__ = ["adagrad", "adam", "lamb", "lion", "zerostep_optimizer_spec"]
