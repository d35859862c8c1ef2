"""Every rank builds the same engine, or none does: one vote at construction.

Ranks that disagree on what the step assumes to be equal do not fail by themselves. Different models,
ZeRO stages, accumulation steps, learning rates, optimizers or precisions pair collectives of different
sizes or meanings: over the shared-memory channel they sum unrelated buffers and train into garbage
(exit code 0), over gloo they abort inside gloo or hang. So ``Engine.__init__`` first reduces what must
be equal to a list of ``(key, value)`` facts (``engine_facts``), and all ranks compare a digest of it
(``agree``) before the first collective that could go wrong: attaching the shared-memory channel, the
broadcast of ``init``, the step. Equal digests cost two tiny collectives (``all_gather_object`` of 16
bytes). On a mismatch every rank gathers every rank's facts and raises ``RanksDisagreeError`` with the
same message on each, naming the first key that differs and both values. A rank whose engine could
not be built at all (any exception before the vote) still votes, with its error as its only fact, so
the others raise at once instead of waiting in a collective until the group's timeout.

Values are compared as strings: ``repr`` of plain values, with dict keys sorted, so equal configs
given in another key order agree.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

Facts = list[tuple[str, str]]

# Config blocks that may differ between ranks without changing the step: logging and monitoring
# (a per-rank log folder is common), and how the data loader drops its last batch.
RANK_LOCAL_CONFIG_KEYS = (
    "steps_per_print",
    "wall_clock_breakdown",
    "dataloader_drop_last",
    "tensorboard",
    "csv_monitor",
    "wandb",
)
# Environment variables that change which collectives a rank issues (parallel/collectives.py).
COLLECTIVE_ENV = ("ZEROSTEP_GLOO_COLLECTIVES",)
_FAILED = "<engine construction>"
_SHOWN_VALUE_CHARS = 160


class RanksDisagreeError(ValueError):
    """The ranks of a process group were given different models, configs or settings."""


def flatten(prefix: str, value: Any) -> Facts:
    """``(dotted key, repr)`` leaves of nested mappings (keys sorted, a ``type`` first: it says what the
    other keys mean); other values are leaves."""
    if isinstance(value, Mapping):
        out: Facts = []
        for key in sorted(value, key=lambda k: (k != "type", str(k))):
            out += flatten(f"{prefix}.{key}" if prefix else str(key), value[key])
        return out
    if isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
        out = []
        for index, item in enumerate(value):
            out += flatten(f"{prefix}[{index}]", item)
        return out
    return [(prefix, repr(value))]


def engine_facts(
    config_dict: Mapping[str, Any],
    layouts: Mapping[str, Any],
    constants: Mapping[str, torch.Tensor],
    *,
    compile: bool,
    device: torch.device,
    param_groups: Iterable[Any] | None = None,
) -> Facts:
    """What the step reads that must be equal on every rank, as ``(key, value)`` pairs in the order a
    difference is reported: versions and settings, the config (``Config.to_dict()`` without
    ``RANK_LOCAL_CONFIG_KEYS``: batch triple, precision, ZeRO block, optimizer and its hyperparameters,
    scheduler, clipping, ...), the trainable parameters unit by unit (name, shape, compute dtype), the
    buffers and frozen parameters, and the parameter groups."""
    facts: Facts = [
        ("torch version", torch.__version__),
        ("compile", repr(bool(compile))),
        ("device type", device.type),
    ]
    facts += [(f"${name}", repr(os.environ.get(name, ""))) for name in COLLECTIVE_ENV]
    kept = {k: v for k, v in config_dict.items() if k not in RANK_LOCAL_CONFIG_KEYS}
    facts += flatten("config", kept)
    for unit, layout in layouts.items():
        for entry in layout.entries:
            facts.append((f"parameter {entry.name!r}", f"shape {tuple(entry.shape)} {layout.dtype}"))
        facts.append((f"unit {unit!r}", f"{len(layout.entries)} parameters, {layout.padded_numel} elements"))
    for name, tensor in constants.items():
        facts.append((f"buffer {name!r}", f"shape {tuple(tensor.shape)} {tensor.dtype}"))
    for index, group in enumerate(param_groups or ()):
        names = tuple(getattr(group, "names", ()))
        facts.append((f"param group {index} parameters", _digest(repr(names))[:16] + f" ({len(names)})"))
        facts += flatten(f"param group {index}", dict(getattr(group, "options", {}) or {}))
    return facts


def failure_facts(error: BaseException) -> Facts:
    """The one fact of a rank whose engine could not be built."""
    return [(_FAILED, f"{type(error).__name__}: {error}")]


def agree(facts: Facts, group: dist.ProcessGroup | None) -> None:
    """Return when every rank of ``group`` holds the same ``facts``; else raise ``RanksDisagreeError`` on
    every rank. Collective (bounded by the group's timeout); nothing to do for one rank."""
    if group is None or dist.get_world_size(group) < 2:
        return
    world_size = dist.get_world_size(group)
    digests: list[Any] = [None] * world_size
    dist.all_gather_object(digests, _digest(repr(facts)), group=group)
    if all(d == digests[0] for d in digests):
        return
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, facts, group=group)
    raise RanksDisagreeError(describe_difference(everyone))


def agree_after_failure(error: BaseException, group: dist.ProcessGroup | None) -> None:
    """The vote of a rank whose engine construction raised ``error``: the other ranks learn of it and
    raise too. Returns (the caller re-raises ``error``) whatever the vote says."""
    try:
        agree(failure_facts(error), group)
    except RanksDisagreeError:
        pass


def describe_difference(everyone: list[Facts]) -> str:
    """The message for facts that differ: the first rank unlike rank 0, and its first differing key."""
    failed = [r for r, facts in enumerate(everyone) if facts and facts[0][0] == _FAILED]
    if failed:
        r = failed[0]
        others = f" (and on ranks {failed[1:]})" if len(failed) > 1 else ""
        return (
            f"rank {r} could not build its engine{others}: {_shown(everyone[r][0][1])}; every rank raises "
            "because the ranks must build their engines together"
        )
    reference = dict(everyone[0])
    order = [k for k, _ in everyone[0]]
    for r, facts in enumerate(everyone[1:], start=1):
        theirs = dict(facts)
        if theirs == reference:
            continue
        keys = order + [k for k, _ in facts if k not in reference]
        diffs = [k for k in keys if reference.get(k) != theirs.get(k)]
        key = diffs[0]
        more = f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else ""
        unlike = [q for q in range(1, len(everyone)) if dict(everyone[q]) != reference]
        ranks = f"rank {r} differs" if len(unlike) == 1 else f"ranks {unlike} differ"
        return (
            f"the ranks disagree on what must be equal on every rank: {key} is "
            f"{_shown(reference.get(key))} on rank 0 but {_shown(theirs.get(key))} on rank {r}{more}; "
            f"{ranks} from rank 0. Every rank must build its engine from the same model, config "
            "and settings"
        )
    raise AssertionError("digests differed but the facts are equal")  # a digest collision


def _shown(value: str | None) -> str:
    if value is None:
        return "absent"
    return value if len(value) <= _SHOWN_VALUE_CHARS else value[: _SHOWN_VALUE_CHARS - 3] + "..."


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]
