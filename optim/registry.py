"""The optimizer and scheduler type names zerostep accepts in a DeepSpeed config (lower-cased).

Kept in a module of its own so ``core.config`` can validate names without importing the optimizers.
"""

OPTIMIZER_TYPES: tuple[str, ...] = ("adam", "adamw", "lamb", "adagrad", "sgd", "lion")

# DeepSpeed's scheduler class names, in DeepSpeed's spelling; matching is case-insensitive.
SCHEDULER_TYPES: tuple[str, ...] = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest")

# DeepSpeed optimizers zerostep does not implement; named in errors so users see why.
UNSUPPORTED_OPTIMIZER_TYPES: tuple[str, ...] = (
    "onebitadam", "onebitlamb", "zerooneadam", "muon", "adafactor", "fusedadam", "cpuadam",
)
