"""The optimizer and scheduler type names zerostep accepts in a DeepSpeed config (lower-cased).

Kept in a module of its own so ``core.config`` can validate names without importing the optimizers.
Besides its own optimizers, DeepSpeed builds Muon (its MuonWithAuxAdam), mup's MuAdam/MuAdamW/MuSGD, and
for any other name ``getattr(torch.optim, name)``; so does zerostep (matching names case-insensitively).
"""

import torch

# DeepSpeed's compressed-communication optimizers (ZeRO stage 0 only; optim/onebit_adam.py,
# optim/zero_one_adam.py, optim/onebit_lamb.py)
COMPRESSED_OPTIMIZER_TYPES: tuple[str, ...] = ("onebitadam", "zerooneadam", "onebitlamb")
NATIVE_OPTIMIZER_TYPES: tuple[str, ...] = (
    "adam",
    "adamw",
    "lamb",
    "adagrad",
    "sgd",
    "lion",
    *COMPRESSED_OPTIMIZER_TYPES,
)
MUON_TYPE = "muon"  # DeepSpeed's MuonWithAuxAdam (not torch.optim.Muon, which the name would otherwise reach)
MUP_OPTIMIZER_TYPES: tuple[str, ...] = ("muadam", "muadamw", "musgd")

# torch.optim classes that cannot run over flat shards (see zerostep.optim.torch_adapter.REFUSED)
TORCH_REFUSED_TYPES: tuple[str, ...] = ("lbfgs", "sparseadam")


def _torch_optimizer_types() -> tuple[str, ...]:
    names = []
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
        ):
            names.append(name.lower())
    taken = {*NATIVE_OPTIMIZER_TYPES, MUON_TYPE, *TORCH_REFUSED_TYPES}
    return tuple(sorted(n for n in names if n not in taken))


# every other torch.optim class of the installed torch (rmsprop, nadam, radam, adamax, asgd, ...)
TORCH_OPTIMIZER_TYPES: tuple[str, ...] = _torch_optimizer_types()

OPTIMIZER_TYPES: tuple[str, ...] = (
    *NATIVE_OPTIMIZER_TYPES,
    MUON_TYPE,
    *MUP_OPTIMIZER_TYPES,
    *TORCH_OPTIMIZER_TYPES,
)

# Optimizers that work per parameter and need the engine's ``param_pieces`` (and friends)
PER_PARAMETER_TYPES: tuple[str, ...] = (MUON_TYPE, *MUP_OPTIMIZER_TYPES, *TORCH_OPTIMIZER_TYPES)

# DeepSpeed's scheduler class names, in DeepSpeed's spelling; matching is case-insensitive.
SCHEDULER_TYPES: tuple[str, ...] = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest")

# Optimizers zerostep does not implement; named in errors so users see why.
UNSUPPORTED_OPTIMIZER_TYPES: tuple[str, ...] = (
    "fusedadam",
    "cpuadam",
    *TORCH_REFUSED_TYPES,
)
