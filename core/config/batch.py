"""The batch triple and the world size, resolved as DeepSpeed 0.19's ``_set_batch_related_parameters``.

TB = train_batch_size, MB = train_micro_batch_size_per_gpu, GAS = gradient_accumulation_steps,
WS = data-parallel world size. Any two derive the third; one alone sets GAS = 1. Floor division is
DeepSpeed's, so inputs that do not divide fail the checks below (in DeepSpeed's order) rather than
being rounded into a different batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from zerostep.core.config.values import AUTO, DERIVED, Block, ConfigError, integer

TB = "train_batch_size"
MB = "train_micro_batch_size_per_gpu"
GAS = "gradient_accumulation_steps"
BATCH_KEYS = (TB, MB, GAS)


class Batch(NamedTuple):
    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int


def resolve_world_size(world_size: Any = None) -> int:
    """The argument, else the initialized default process group's size, else 1."""
    if world_size is not None:
        return integer("world_size", world_size, minimum=1)
    import torch.distributed as dist  # lazily: reading a config should not pay for torch

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def resolve_batch(
    tb: int | None, mb: int | None, gas: int | None, world_size: int
) -> tuple[Batch, tuple[str, ...]]:
    """The resolved triple and the names of the keys that were derived rather than given."""
    ws = world_size
    if tb is not None and mb is not None and gas is not None:
        derived: tuple[str, ...] = ()
    elif tb is not None and mb is not None:
        gas, derived = (tb // mb) // ws if mb != 0 else 0, (GAS,)
    elif tb is not None and gas is not None:
        mb, derived = (tb // ws) // gas if gas != 0 else 0, (MB,)
    elif mb is not None and gas is not None:
        tb, derived = mb * gas * ws, (TB,)
    elif tb is not None:
        gas, mb, derived = 1, tb // ws, (GAS, MB)
    elif mb is not None:
        tb, gas, derived = mb * ws, 1, (TB, GAS)
    else:
        raise ConfigError(
            f"batch size: one of {TB} or {MB} is required "
            f"(given: {GAS} = {gas if gas is not None else 'absent'}); DeepSpeed derives the rest"
        )
    given = (
        f"(train_batch_size={tb}, train_micro_batch_size_per_gpu={mb}, "
        f"gradient_accumulation_steps={gas}, world_size={ws})"
    )
    # DeepSpeed's _batch_assertion, in its order.
    if tb <= 0:
        raise ConfigError(f"{TB} = {tb}: must be > 0 {given}")
    if mb <= 0:
        raise ConfigError(f"{MB} = {mb}: must be > 0{_how(MB, derived)} {given}")
    if gas <= 0:
        raise ConfigError(f"{GAS} = {gas}: must be > 0{_how(GAS, derived)} {given}")
    if tb != mb * gas * ws:
        raise ConfigError(
            f"{TB} = {tb}: must equal {MB} * {GAS} * world_size = {mb} * {gas} * {ws} = {mb * gas * ws}"
        )
    return Batch(tb, mb, gas), derived


def _how(key: str, derived: tuple[str, ...]) -> str:
    if key not in derived:
        return ""
    return " (derived by floor division, as DeepSpeed does: the given sizes do not divide evenly)"


def read_batch(top: Block, world_size: int) -> Batch:
    """Read the three keys from the top-level block (``"auto"`` = absent, derived if possible)."""
    values: dict[str, int | None] = {}
    autos: list[str] = []
    for key in BATCH_KEYS:
        top.allow(key)
        raw = top.raw.get(key)
        if raw == "auto":
            autos.append(key)
            raw = None
        # DeepSpeed's pydantic-free reader takes the numbers as they are; negative and zero values
        # reach its > 0 checks, so they are read here as plain integers and checked by resolve_batch.
        values[key] = None if raw is None else integer(top.key_path(key), raw)
    try:
        batch, derived = resolve_batch(values[TB], values[MB], values[GAS], world_size)
    except ConfigError:
        if autos:  # report them with every other "auto" zerostep cannot fill, saying what would
            for key in autos:
                top.ctx.unresolved(key)
            top.ctx.raise_unresolved()
        raise
    for key in BATCH_KEYS:
        if key in derived:
            top.record(key, AUTO if key in autos else DERIVED)
        else:
            top.record(key, top.origin(key))
    return batch
