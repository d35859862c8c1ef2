"""The training-schedule blocks DeepSpeed 0.19 removed and zerostep still serves: ``progressive_layer_drop``
and the legacy top-level ``curriculum_learning`` (DeepSpeed <= 0.17's keys and defaults)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from zerostep.core.config.values import Block, boolean, fail, integer_list, number, positive_int, text, warn

SCHEDULE_TYPES = ("fixed_linear", "fixed_root", "fixed_discrete")


@dataclass(frozen=True)
class ProgressiveLayerDropConfig:
    enabled: bool = False
    theta: float = 1.0  # the keep probability's floor (DeepSpeed's config default; the paper's 0.5)
    gamma: float = 0.001  # how fast it decays towards theta


@dataclass(frozen=True)
class CurriculumConfig:
    """Legacy ``curriculum_learning``: a difficulty (for ``seqlen``, the sequence length) per step."""

    enabled: bool = False
    curriculum_type: str = "seqlen"
    min_difficulty: int = 0
    max_difficulty: int = 0
    schedule_type: str = "fixed_linear"
    total_curriculum_step: int = 0  # fixed_linear / fixed_root
    difficulty_step: int = 1  # fixed_linear / fixed_root: difficulties are multiples of it
    root_degree: int = 1  # fixed_root
    difficulty: tuple[int, ...] = ()  # fixed_discrete: one more than max_step
    max_step: tuple[int, ...] = ()

    def deepspeed_dict(self) -> dict[str, Any]:
        """The block as DeepSpeed writes it (schedule keys nested under ``schedule_config``), so that
        ``Config.to_dict`` round-trips."""
        if not self.enabled:
            return {"enabled": False}
        if self.schedule_type == "fixed_discrete":
            schedule = {"difficulty": list(self.difficulty), "max_step": list(self.max_step)}
        else:
            schedule = {
                "total_curriculum_step": self.total_curriculum_step,
                "difficulty_step": self.difficulty_step,
            }
            if self.schedule_type == "fixed_root":
                schedule["root_degree"] = self.root_degree
        return {
            "enabled": True,
            "curriculum_type": self.curriculum_type,
            "min_difficulty": self.min_difficulty,
            "max_difficulty": self.max_difficulty,
            "schedule_type": self.schedule_type,
            "schedule_config": schedule,
        }


def parse_progressive_layer_drop(block: Block | None) -> ProgressiveLayerDropConfig:
    if block is None:
        return ProgressiveLayerDropConfig()
    d = ProgressiveLayerDropConfig()
    config = ProgressiveLayerDropConfig(
        enabled=block.take("enabled", d.enabled, boolean),
        theta=block.take("theta", d.theta, lambda p, v: number(p, v, minimum=0.0, maximum=1.0)),
        gamma=block.take("gamma", d.gamma, lambda p, v: number(p, v, minimum=0.0)),
    )
    block.finish()
    if config.enabled and config.theta == 0.0:
        raise fail(block.key_path("theta"), 0.0, "must be in (0, 1]: theta 0 would drop every layer")
    return config


def read_stepped_schedule(sc: Block, schedule: str) -> tuple[int, int, int]:
    """A fixed_linear / fixed_root ``schedule_config`` (every key required, as DeepSpeed reads them):
    ``(total_curriculum_step, difficulty_step, root_degree)``, root_degree 1 for fixed_linear."""
    keys = ("total_curriculum_step", "difficulty_step") + (
        ("root_degree",) if schedule == "fixed_root" else ()
    )
    for key in keys:
        if not sc.has(key):
            raise fail(sc.key_path(key), None, f"is required for schedule_type {schedule!r}")
    total = sc.take("total_curriculum_step", 1, positive_int)
    step = sc.take("difficulty_step", 1, positive_int)
    degree = sc.take("root_degree", 1, positive_int) if schedule == "fixed_root" else 1
    sc.finish()
    return total, step, degree


def parse_curriculum(block: Block | None) -> CurriculumConfig:
    if block is None:
        return CurriculumConfig()
    enabled = block.take("enabled", False, boolean)
    if not enabled:
        block.allow(*block.raw)  # an off block is not read further, as in DeepSpeed
        return CurriculumConfig()
    for key in ("min_difficulty", "max_difficulty", "schedule_type"):
        if not block.has(key):
            raise fail(block.key_path(key), None, "is required when curriculum_learning is enabled")
    kind = block.take("curriculum_type", "seqlen", text)
    if kind != "seqlen":
        warn(
            f"curriculum_learning.curriculum_type = {kind!r} has no effect: the engine acts only on "
            '"seqlen" (cutting batches and passing curriculum_seqlen), as DeepSpeed\'s legacy engine did'
        )
    low = block.take("min_difficulty", 0, positive_int)
    high = block.take("max_difficulty", 0, positive_int)
    schedule = block.take("schedule_type", "fixed_linear", text)
    if high < low:
        raise fail(block.key_path("max_difficulty"), high, f"must be >= min_difficulty ({low})")
    if schedule == "custom":
        raise fail(
            block.key_path("schedule_type"),
            schedule,
            "a custom schedule needs a difficulty function, which zerostep has no API for; use "
            f"one of {', '.join(SCHEDULE_TYPES)}",
        )
    if schedule not in SCHEDULE_TYPES:
        raise fail(block.key_path("schedule_type"), schedule, f"must be one of {', '.join(SCHEDULE_TYPES)}")
    sc = block.child("schedule_config")
    if sc is None:
        raise fail(block.key_path("schedule_config"), None, f"is required for schedule_type {schedule!r}")
    config = CurriculumConfig(enabled=True, curriculum_type=kind, min_difficulty=low, max_difficulty=high)
    if schedule == "fixed_discrete":
        difficulty = sc.take("difficulty", (), integer_list())
        max_step = sc.take("max_step", (), integer_list())
        sc.finish()
        if len(difficulty) != len(max_step) + 1:
            raise fail(
                sc.key_path("difficulty"),
                list(difficulty),
                f"needs one more entry than max_step ({len(max_step)}): the last difficulty holds after "
                "the last max_step",
            )
        if list(max_step) != sorted(max_step):
            raise fail(sc.key_path("max_step"), list(max_step), "must be increasing")
        return dataclasses.replace(config, schedule_type=schedule, difficulty=difficulty, max_step=max_step)
    total, step, degree = read_stepped_schedule(sc, schedule)
    return dataclasses.replace(
        config, schedule_type=schedule, total_curriculum_step=total, difficulty_step=step, root_degree=degree
    )


def curriculum_difficulty(config: CurriculumConfig, global_steps: int) -> int:
    """The difficulty DeepSpeed's legacy scheduler uses in the forward of the step that starts at
    ``global_steps`` (it updates to ``global_steps + 1`` first, and stops moving once at the maximum)."""
    at = global_steps + 1
    if config.schedule_type == "fixed_discrete":
        # the state freezes at max_difficulty: the first segment reaching it holds from its start on
        starts = [1] + [s + 1 for s in config.max_step]
        for start, value in zip(starts, config.difficulty):
            if value >= config.max_difficulty and at >= start:
                return value
        if at > config.max_step[-1]:
            return config.difficulty[-1]
        return next(v for s, v in zip(config.max_step, config.difficulty) if at <= s)
    degree = 1 if config.schedule_type == "fixed_linear" else config.root_degree
    fraction = (float(at) / config.total_curriculum_step) ** (1.0 / degree)
    value = math.floor(fraction * (config.max_difficulty - config.min_difficulty) + config.min_difficulty)
    value -= value % config.difficulty_step
    return min(value, config.max_difficulty)
