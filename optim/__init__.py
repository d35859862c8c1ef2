"""zerostep.optim: functional optimizers over pytrees of tensors, DeepSpeed's LR schedules, Triton kernels.

    opt = zerostep.optim.from_config({"type": "AdamW", "params": {"lr": 1e-3}})
    state = opt.init(params)
    new_params, new_state = opt.update(grads, state, params)      # pure
    opt.update_(grads, state, params, lr, grad_scale=scale)        # in place (the engine's path)
    lr_at = zerostep.optim.lr_schedule({"type": "WarmupLR", "params": {}}, opt.lr)

triton is optional: importing this package never requires it.
"""

from zerostep.optim.adagrad import AdagradState, adagrad
from zerostep.optim.adam import AdamState, adam, adamw
from zerostep.optim.base import Optimizer
from zerostep.optim.config import from_config
from zerostep.optim.lamb import LambState, TrustSegments, lamb
from zerostep.optim.lion import LionState, lion
from zerostep.optim.registry import OPTIMIZER_TYPES, SCHEDULER_TYPES, UNSUPPORTED_OPTIMIZER_TYPES
from zerostep.optim.schedules import ONE_CYCLE_BETA2, lr_schedule, momentum_schedule
from zerostep.optim.sgd import SgdState, sgd

__all__ = [
    "ONE_CYCLE_BETA2",
    "OPTIMIZER_TYPES",
    "SCHEDULER_TYPES",
    "UNSUPPORTED_OPTIMIZER_TYPES",
    "AdagradState",
    "AdamState",
    "LambState",
    "LionState",
    "Optimizer",
    "SgdState",
    "TrustSegments",
    "adagrad",
    "adam",
    "adamw",
    "from_config",
    "lamb",
    "lion",
    "lr_schedule",
    "momentum_schedule",
    "sgd",
]
