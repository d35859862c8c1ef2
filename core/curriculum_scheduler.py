"""DeepSpeed's ``CurriculumScheduler`` (runtime/data_pipeline/curriculum_scheduler.py): a difficulty that
moves with a step count, from ``min_difficulty`` towards ``max_difficulty``.

The formulas are the legacy curriculum's (``curriculum_difficulty`` in core/config/schedules.py, which
the engine's sequence-length curriculum uses too):

- ``fixed_linear`` / ``fixed_root``: ``floor((step / total_curriculum_step) ** (1 / root_degree) *
  (max - min) + min)``, rounded down to a multiple of ``difficulty_step``, capped at ``max``;
- ``fixed_discrete``: ``difficulty[i]`` for the first ``max_step[i] >= step``, the last one after;
- ``custom``: a function of the step the user sets (``set_custom_get_difficulty``).

``update_difficulty(step)`` moves the difficulty only while it is below ``max_difficulty`` (DeepSpeed's
rule: once at the maximum it stays there, even where a discrete or custom schedule would come back
down). The data sampler calls it with its ``curriculum_step``, 1 for the first global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from zerostep.core.config.schedules import CurriculumConfig, curriculum_difficulty

CURRENT_DIFFICULTY = "current_difficulty"  # DeepSpeed's state key


class CurriculumScheduler:
    """One metric's difficulty. ``config``: a parsed ``CurriculumConfig`` or DeepSpeed's dict (one
    ``curriculum_metrics`` entry: min_difficulty, max_difficulty, schedule_type, schedule_config)."""

    def __init__(self, config: CurriculumConfig | Mapping[str, Any], name: str = "curriculum") -> None:
        if isinstance(config, Mapping):
            config = _parse_mapping(config, name)
        self.config = config
        self.name = name
        self.custom_get_difficulty: Callable[[int], int] | None = None
        self.state: dict[str, Any] = {
            "min_difficulty": config.min_difficulty,
            "max_difficulty": config.max_difficulty,
            "schedule_type": config.schedule_type,
            CURRENT_DIFFICULTY: config.min_difficulty,
        }

    def get_current_difficulty(self) -> int:
        return self.state[CURRENT_DIFFICULTY]

    def set_current_difficulty(self, difficulty: int) -> None:
        self.state[CURRENT_DIFFICULTY] = self._checked(difficulty, "set_current_difficulty")

    def set_custom_get_difficulty(self, schedule_function: Callable[[int], int]) -> None:
        if not callable(schedule_function):
            raise TypeError(
                f"{self.name}: the custom schedule must be a function of the step, got {schedule_function!r}"
            )
        self.custom_get_difficulty = schedule_function

    def get_state(self) -> dict[str, Any]:
        return dict(self.state)

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.set_current_difficulty(int(state[CURRENT_DIFFICULTY]))

    def get_difficulty(self, global_steps: int) -> int:
        """The schedule's difficulty at ``global_steps`` (1 = the first step), without the freeze."""
        c = self.config
        if c.schedule_type == "custom":
            if self.custom_get_difficulty is None:
                raise RuntimeError(
                    f"curriculum metric {self.name!r} has schedule_type custom but no function: call "
                    "engine.set_custom_curriculum_learning_schedule({name: fn}) (or the data sampler's) "
                    "before the first batch"
                )
            return self._checked(
                self.custom_get_difficulty(global_steps), f"the custom schedule at step {global_steps}"
            )
        if c.schedule_type == "fixed_discrete":
            for bound, value in zip(c.max_step, c.difficulty):
                if global_steps <= bound:
                    return value
            return c.difficulty[-1]
        # monotone, capped at max: the legacy function's freeze is the identity here
        return curriculum_difficulty(c, global_steps - 1)

    def update_difficulty(self, global_steps: int) -> int:
        if self.state[CURRENT_DIFFICULTY] < self.config.max_difficulty:
            self.state[CURRENT_DIFFICULTY] = self.get_difficulty(global_steps)
        return self.state[CURRENT_DIFFICULTY]

    def _checked(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise TypeError(
                    f"curriculum metric {self.name!r}: {where} gave {value!r}, not an integer difficulty"
                )
        c = self.config
        if value > c.max_difficulty:
            raise ValueError(
                f"curriculum metric {self.name!r}: {where} gave difficulty {value}, beyond max_difficulty "
                f"{c.max_difficulty}"
            )
        return int(value)


def _parse_mapping(config: Mapping[str, Any], name: str) -> CurriculumConfig:
    """A DeepSpeed-style dict through the config parser (same checks and messages)."""
    from zerostep.core.config.data_sampling import CurriculumMetricConfig, parse_metric_schedule
    from zerostep.core.config.values import Block, Context

    raw = dict(config)
    kind = raw.pop("difficulty_type", "value")
    for key in ("clustering_type", "index_to_sample_path", "index_to_metric_path"):
        raw.pop(key, None)
    block = Block(raw, name, Context(lambda path: "user"))
    schedule = parse_metric_schedule(block, kind)
    block.finish()
    return CurriculumMetricConfig(difficulty_type=kind, **schedule).schedule
