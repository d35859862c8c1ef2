"""Elastic training: DeepSpeed's choice of one global batch size that many world sizes can train.

``compute_elastic_config`` reproduces DeepSpeed's (``deepspeed.elasticity``, versions 0.1 and 0.2):
candidate batch sizes are each micro-batch size (and their least common multiple) scaled by the
largest highly composite number that keeps them under ``max_train_batch_size``; the candidate that
the most world sizes in ``[min_gpus, max_gpus]`` divide into whole micro-batches wins (ties: the
larger batch, or the smaller with ``prefer_larger_batch: false``). At a given world size the
micro-batch is the largest listed one that divides the per-rank batch, and gradient accumulation
makes up the rest, so every valid world size trains the same global batch.

What zerostep adds: its checkpoints reshard, so a run restarted at another valid world size resumes
from its checkpoint with the same global batch and the same optimizer trajectory (tests/test_elasticity.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from functools import reduce

from zerostep.errors import ConfigError

LATEST_VERSION = 0.2
MINIMUM_DEEPSPEED_VERSION = (0, 3, 8)  # the first DeepSpeed with elasticity
ELASTICITY_CONFIG_ENV = "DEEPSPEED_ELASTICITY_CONFIG"  # what a resource scheduler saw
# highly composite numbers: the scale factors DeepSpeed tries (each has more divisors than any smaller)
HCN = (1, 2, 4, 6, 12, 24, 36, 48, 60, 120, 180, 240, 360, 720, 840, 1260, 1680, 2520, 5040, 7560, 10080)
HCN += (15120, 20160, 25200, 27720, 45360, 50400, 55440, 83160, 110880, 166320, 221760, 277200, 332640)
HCN += (498960, 554400, 665280, 720720)

log = logging.getLogger(__name__)


class ElasticityError(ConfigError):
    """Elastic training cannot run as configured (DeepSpeed's name)."""


class ElasticityConfigError(ElasticityError):
    """The ``elasticity`` block is missing, off, or inconsistent (DeepSpeed's name)."""


class ElasticityIncompatibleWorldSize(ElasticityError):
    """The world size is not one the elastic batch size allows (DeepSpeed's name)."""


@dataclasses.dataclass(frozen=True)
class ElasticityConfig:
    """The ``elasticity`` block, with DeepSpeed's keys and defaults."""

    enabled: bool = False
    max_train_batch_size: int = 2000
    micro_batch_sizes: tuple[int, ...] = (2, 4, 6)
    min_gpus: int = 1
    max_gpus: int = 10000
    min_time: int = 0  # minutes between rescales: for the resource scheduler, not the engine
    version: float = LATEST_VERSION
    prefer_larger_batch: bool = True
    ignore_non_elastic_batch_info: bool = False
    num_gpus_per_node: int = 1
    model_parallel_size: int = 1


@dataclasses.dataclass(frozen=True)
class ElasticBatch:
    train_batch_size: int
    valid_world_sizes: tuple[int, ...]
    micro_batch_size: int | None  # None without a world size to pick it for


def _candidate_batch_sizes(bases: list[int], max_batch: int) -> list[int]:
    out = set()
    for base in bases:
        if base >= max_batch:
            out.add(base)
            continue
        quotient = max_batch // base
        # the largest HCN <= quotient (DeepSpeed's argmax(HCN > quotient) - 1, wrapping past the end)
        above = next((i for i, h in enumerate(HCN) if h > quotient), 0)
        out.add(HCN[above - 1] * base)
    return sorted(out)


def _valid_world_sizes(batch: int, micro_batches: tuple[int, ...], low: int, high: int) -> list[int]:
    valid = set()
    for micro in micro_batches:
        if batch % micro:
            continue
        most = batch // micro  # ranks when each takes one micro-batch per step
        if low <= most <= high:
            valid.add(most)
        valid.update(i for i in range(max(low, 1), min(most // 2, high) + 1) if most % i == 0)
    return sorted(valid)


def _best(candidates: list[int], micro_batches: tuple[int, ...], low: int, high: int, larger: bool):
    best_count, best_sizes, best_batch = 0, None, min(micro_batches)
    # DeepSpeed walks a set; the result does not depend on the order except through ties, which
    # the preference resolves, so sorted order gives its answers
    for batch in candidates:
        sizes = _valid_world_sizes(batch, micro_batches, low, high)
        better_tie = len(sizes) == best_count and (batch > best_batch if larger else batch < best_batch)
        if len(sizes) > best_count or better_tie:
            best_count, best_sizes, best_batch = len(sizes), sizes, batch
    return best_batch, best_sizes


def _v01(c: ElasticityConfig, max_batch: int, low: int | None, high: int | None):
    low = low or 1
    high = high or max_batch // min(c.micro_batch_sizes)
    if any(m > max_batch for m in c.micro_batch_sizes):
        raise ElasticityConfigError(
            f"elasticity.micro_batch_sizes = {list(c.micro_batch_sizes)}: every micro-batch size must be "
            f"<= max_train_batch_size ({max_batch})"
        )
    lcm = reduce(lambda a, b: a * b // math.gcd(a, b), c.micro_batch_sizes)
    candidates = _candidate_batch_sizes([*c.micro_batch_sizes, lcm], max_batch)
    return _best(candidates, c.micro_batch_sizes, low, high, c.prefer_larger_batch)


def _v02(c: ElasticityConfig, world_size: int):
    if c.num_gpus_per_node % c.model_parallel_size:
        raise ElasticityConfigError(
            f"elasticity: num_gpus_per_node ({c.num_gpus_per_node}) must be divisible by "
            f"model_parallel_size ({c.model_parallel_size}) in version 0.2"
        )
    dp_per_node = c.num_gpus_per_node // c.model_parallel_size
    # version 0.2 counts nodes: the 0.1 search over node counts, scaled back to ranks
    batch, nodes = _v01(
        c,
        int(c.max_train_batch_size / dp_per_node),
        int(c.min_gpus / c.num_gpus_per_node),
        int(c.max_gpus / c.num_gpus_per_node),
    )
    batch = int(batch) * dp_per_node
    valid = [n * dp_per_node for n in nodes or []]
    if world_size // c.model_parallel_size in valid:
        return batch, valid
    # this world size is not in the list: the largest (or smallest) batch it can take
    dp = (world_size / c.num_gpus_per_node) * dp_per_node
    sizes = [math.floor(c.max_train_batch_size / float(m * dp)) * m * dp for m in c.micro_batch_sizes]
    batch = int(max(sizes) if c.prefer_larger_batch else min(sizes))
    return batch, [int(dp)]


def elastic_batch(c: ElasticityConfig, world_size: int = 0) -> ElasticBatch:
    """The global batch, the valid world sizes and (given ``world_size`` > 0) the micro-batch there."""
    if not c.enabled:
        raise ElasticityConfigError("elasticity is disabled; set elasticity.enabled = true")
    if c.model_parallel_size > 1 and float(c.version) != 0.2:
        raise ElasticityConfigError(
            f"elasticity version {c.version} does not support model parallelism "
            f"(model_parallel_size = {c.model_parallel_size}); use version 0.2"
        )
    if float(c.version) == 0.1:
        batch, valid = _v01(c, c.max_train_batch_size, c.min_gpus, c.max_gpus)
    elif float(c.version) == 0.2:
        if world_size <= 0:
            env = os.environ.get("WORLD_SIZE", "")
            if not env.isnumeric():
                raise ElasticityConfigError(
                    "elasticity version 0.2 needs the world size: pass world_size or set WORLD_SIZE "
                    f"(WORLD_SIZE = {env!r})"
                )
            world_size = int(env)
        batch, valid = _v02(c, world_size)
    else:
        raise ElasticityConfigError(f"elasticity.version = {c.version}: must be 0.1 or 0.2")
    valid = list(valid or [])
    micro = None  # version 0.1 without a world size: no micro-batch to pick
    if world_size > 0:
        if world_size not in valid:
            raise ElasticityIncompatibleWorldSize(
                f"world size {world_size} is not valid for elastic batch size {batch}: valid world sizes "
                f"are {valid} (elasticity: max_train_batch_size {c.max_train_batch_size}, "
                f"micro_batch_sizes {list(c.micro_batch_sizes)}, gpus {c.min_gpus}-{c.max_gpus})"
            )
        micro = next(
            (m for m in sorted(set(c.micro_batch_sizes), reverse=True) if batch // world_size % m == 0), None
        )
        if micro is None:
            raise ElasticityError(
                f"elasticity: no micro-batch size in {list(c.micro_batch_sizes)} divides the per-rank "
                f"batch {batch // world_size} (batch {batch}, world size {world_size})"
            )
    return ElasticBatch(int(batch), tuple(valid), micro)


def check_scheduler_agrees(c: ElasticityConfig, environ: dict[str, str] | None = None) -> None:
    """DeepSpeed's ``ensure_immutable_elastic_config``: the block a resource scheduler exported in
    ``DEEPSPEED_ELASTICITY_CONFIG`` must match the runtime's on the batch-deciding keys."""
    raw = (os.environ if environ is None else environ).get(ELASTICITY_CONFIG_ENV)
    if raw is None:
        log.info(
            "%s is not set: no resource scheduler's elastic config to check against", ELASTICITY_CONFIG_ENV
        )
        return
    seen = json.loads(raw)
    theirs = {
        "max_train_batch_size": seen.get("max_train_batch_size", 2000),
        "micro_batch_sizes": list(seen.get("micro_batch_sizes", [2, 4, 6])),
        "version": float(seen.get("version", LATEST_VERSION)),
    }
    ours = {
        "max_train_batch_size": c.max_train_batch_size,
        "micro_batch_sizes": list(c.micro_batch_sizes),
        "version": float(c.version),
    }
    for key, value in ours.items():
        if theirs[key] != value:
            raise ElasticityConfigError(
                f"elasticity.{key} = {value} differs from the resource scheduler's {theirs[key]} "
                f"(from {ELASTICITY_CONFIG_ENV})"
            )


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)
