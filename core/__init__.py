"""zerostep.core: config, state, precision, the step's composition, ``initialize``/``Engine``, CLI.

Start reading at ``step.py`` (the four phases and how they compose), then ``engine.py`` (how the
phases are built once and run over a ``TrainState``), then ``state.py`` and ``precision.py``.
"""

from zerostep.core.agreement import RanksDisagreeError
from zerostep.core.config import Config, ConfigError
from zerostep.core.engine import Engine, initialize
from zerostep.core.precision import LossScaleError, ScalerState, loss_scale_init, loss_scale_update
from zerostep.core.state import ConsumedStateError, FlatParams, Metrics, TrainState
from zerostep.core.step import compose
from zerostep.core.step_failure import RanksOutOfStepError, RemoteStepError

__all__ = [
    "Config",
    "ConfigError",
    "ConsumedStateError",
    "Engine",
    "FlatParams",
    "LossScaleError",
    "Metrics",
    "RanksDisagreeError",
    "RanksOutOfStepError",
    "RemoteStepError",
    "ScalerState",
    "TrainState",
    "compose",
    "initialize",
    "loss_scale_init",
    "loss_scale_update",
]
