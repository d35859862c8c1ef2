"""zerostep.runtime: DeepSpeed's ``deepspeed.runtime`` pieces, the imperative facade over ``zerostep.core``.

- ``engine``: ``DeepSpeedEngine`` (``engine(x)``, ``backward``, ``step``, checkpoints) and what
  ``zerostep.initialize`` builds around it (``initialize``, ``client_optimizer``, ``zero_optimizer``,
  ``lr_schedules``, ``checkpoint``);
- ``dataloader``: ``DeepSpeedDataLoader``, ``RepeatingLoader`` and ``make_dataloader`` (``training_data``);
- ``config_sources``: ``resolve_config_sources``, one config from ``args`` / ``config`` / ``config_params``.

The engine is imported on first use (``zerostep.runtime.DeepSpeedEngine``), so importing the loader or
the config sources does not build the whole facade.
"""

from typing import Any

from zerostep.runtime.config_sources import resolve_config_sources
from zerostep.runtime.dataloader import DeepSpeedDataLoader, RepeatingLoader, make_dataloader

__all__ = [
    "DeepSpeedDataLoader",
    "DeepSpeedEngine",
    "RepeatingLoader",
    "make_dataloader",
    "resolve_config_sources",
]


def __getattr__(name: str) -> Any:
    if name == "DeepSpeedEngine":
        from zerostep.runtime.engine import DeepSpeedEngine

        return DeepSpeedEngine
    raise AttributeError(f"module 'zerostep.runtime' has no attribute {name!r}")
