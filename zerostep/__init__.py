"""zerostep: DeepSpeed's training engine as pure functions over an explicit state pytree.

The code lives in four subpackages mapped from the repository's top-level folders:
``zerostep.core`` (config, state, step, engine, CLI), ``zerostep.parallel`` (process groups,
flat-buffer sharding, collectives, ZeRO), ``zerostep.optim`` (optimizers, schedules, kernels) and
``zerostep.io`` (msgpack pytree codec, checkpoints). This package itself holds only what all four
share: the error types.
"""

from zerostep.errors import ConfigError

__version__ = "0.1.0"
__all__ = ["ConfigError", "__version__"]
