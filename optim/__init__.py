"""zerostep.optim: functional optimizers over pytrees of tensors, DeepSpeed's LR schedules, Triton kernels.

    opt = zerostep.optim.from_config({"type": "AdamW", "params": {"lr": 1e-3}})
    state = opt.init(params)
    new_params, new_state = opt.update(grads, state, params)      # pure
    opt.update_(grads, state, params, lr, grad_scale=scale)        # in place (the engine's path)
    lr_at = zerostep.optim.lr_schedule({"type": "WarmupLR", "params": {}}, opt.lr)

Besides adam, adamw, lamb, adagrad, sgd and lion: DeepSpeed's compressed-communication optimizers
1-bit Adam, 0/1 Adam and 1-bit LAMB (``onebit_adam``, ``zero_one_adam``, ``onebit_lamb``: update
variants the engine picks per step on the host, ``phase_schedule``; it supplies their collective);
``muon`` (DeepSpeed's MuonWithAuxAdam), mup's MuAdam/MuAdamW/MuSGD (``mu_optimizer``), and any
torch.optim class or instance (``from_torch_optimizer(torch.optim.RMSprop, {"lr": 1e-3})``), as
DeepSpeed's engine builds them.

triton is optional: importing this package never requires it.
"""

from zerostep.optim.adagrad import AdagradState, adagrad
from zerostep.optim.adam import AdamState, adam, adamw
from zerostep.optim.base import Optimizer
from zerostep.optim.config import from_config
from zerostep.optim.lamb import LambState, TrustSegments, lamb
from zerostep.optim.lion import LionState, lion
from zerostep.optim.muon import MuonState, muon
from zerostep.optim.mup import WidthInfo, mu_optimizer, param_widths
from zerostep.optim.newton_schulz import newton_schulz
from zerostep.optim.onebit_adam import OneBitAdamState, compressed_phase, fresh_error_feedback, onebit_adam
from zerostep.optim.onebit_lamb import OneBitLambState, onebit_lamb
from zerostep.optim.phase_schedule import PhaseSchedule, phase_schedule
from zerostep.optim.pieces import FlatPieces, ParamPiece, layout_pieces
from zerostep.optim.registry import (
    COMPRESSED_OPTIMIZER_TYPES,
    MUP_OPTIMIZER_TYPES,
    OPTIMIZER_TYPES,
    PER_PARAMETER_TYPES,
    SCHEDULER_TYPES,
    UNSUPPORTED_OPTIMIZER_TYPES,
)
from zerostep.optim.schedules import ONE_CYCLE_BETA2, lr_schedule, momentum_schedule
from zerostep.optim.sgd import SgdState, sgd
from zerostep.optim.torch_adapter import (
    TorchOptimizerState,
    from_torch_optimizer,
    torch_optimizer_class,
    torch_param_hyperparams,
)
from zerostep.optim.zero_one_adam import ZeroOneAdamState, zero_one_adam

__all__ = [
    "COMPRESSED_OPTIMIZER_TYPES",
    "ONE_CYCLE_BETA2",
    "MUP_OPTIMIZER_TYPES",
    "OPTIMIZER_TYPES",
    "PER_PARAMETER_TYPES",
    "SCHEDULER_TYPES",
    "UNSUPPORTED_OPTIMIZER_TYPES",
    "AdagradState",
    "AdamState",
    "FlatPieces",
    "LambState",
    "LionState",
    "MuonState",
    "OneBitAdamState",
    "OneBitLambState",
    "Optimizer",
    "ParamPiece",
    "PhaseSchedule",
    "SgdState",
    "TorchOptimizerState",
    "TrustSegments",
    "WidthInfo",
    "ZeroOneAdamState",
    "adagrad",
    "adam",
    "adamw",
    "compressed_phase",
    "fresh_error_feedback",
    "from_config",
    "from_torch_optimizer",
    "lamb",
    "layout_pieces",
    "lion",
    "lr_schedule",
    "momentum_schedule",
    "mu_optimizer",
    "muon",
    "newton_schulz",
    "onebit_adam",
    "onebit_lamb",
    "param_widths",
    "phase_schedule",
    "sgd",
    "torch_optimizer_class",
    "torch_param_hyperparams",
    "zero_one_adam",
]
