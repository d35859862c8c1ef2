"""``data_efficiency.data_sampling``: DeepSpeed 0.19's metric-based curriculum (keys and defaults of
deepspeed/runtime/data_pipeline/constants.py and config.py).

DeepSpeed's engine builds its curriculum sampler when ``data_sampling.curriculum_learning.enabled`` is
true, whatever ``data_sampling.enabled`` and ``data_efficiency.enabled`` say; zerostep does the same and
warns when an outer switch is off. ``data_sampling.enabled`` alone changes nothing in DeepSpeed (the
ordinary loader runs), so it warns here. ``dynamic_batching`` is parsed by DeepSpeed but its engine never
acts on it (a user builds the loader with ``variable_batch_size_and_lr``); zerostep refuses it switched on.

Each curriculum metric's schedule is the legacy curriculum's (``CurriculumConfig``,
core/config/schedules.py: fixed_linear, fixed_root, fixed_discrete) plus ``custom`` (a function the user
sets with ``engine.set_custom_curriculum_learning_schedule``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from zerostep.core.config.schedules import CurriculumConfig, read_stepped_schedule
from zerostep.core.config.values import (
    Block,
    ConfigError,
    boolean,
    choice,
    fail,
    integer,
    integer_list,
    optional,
    positive_int,
    text,
    warn,
)

DIFFICULTY_TYPES = ("value", "percentile")
CLUSTERING_TYPES = ("single_cluster", "schedule_based")
SCHEDULE_TYPES = ("fixed_linear", "fixed_root", "fixed_discrete", "custom")
NUM_EPOCHS_DEFAULT = 1000  # DeepSpeed's DATA_SAMPLING_NUM_EPOCHS_DEFAULT


@dataclass(frozen=True)
class CurriculumMetricConfig:
    """One entry of ``curriculum_metrics`` (its name is the key): where its index files are and how its
    difficulty moves. The fields are DeepSpeed's keys, so ``Config.to_dict`` writes them back as given."""

    index_to_sample_path: str | None = None  # prefix of the .bin/.idx pair: sample indices per metric value
    index_to_metric_path: str | None = None  # ... the metric value of each row (value-based only)
    difficulty_type: str = "value"  # value: metric <= difficulty; percentile: the easiest difficulty% of data
    clustering_type: str = "schedule_based"  # single_cluster: every sample, the difficulty only reported
    min_difficulty: int = 0
    max_difficulty: int = 0
    schedule_type: str = "fixed_linear"
    schedule_config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def schedule(self) -> CurriculumConfig:
        """The schedule in the legacy curriculum's dataclass (its formulas, core/config/schedules.py)."""
        sc = self.schedule_config
        return CurriculumConfig(
            enabled=True,
            curriculum_type=self.difficulty_type,
            min_difficulty=self.min_difficulty,
            max_difficulty=self.max_difficulty,
            schedule_type=self.schedule_type,
            total_curriculum_step=sc.get("total_curriculum_step", 0),
            difficulty_step=sc.get("difficulty_step", 1),
            root_degree=sc.get("root_degree", 1),
            difficulty=tuple(sc.get("difficulty", ())),
            max_step=tuple(sc.get("max_step", ())),
        )

    @property
    def clusters(self) -> bool:
        """Whether the metric selects samples (reads its index files)."""
        return self.clustering_type != "single_cluster"


@dataclass(frozen=True)
class DataCurriculumConfig:
    enabled: bool = False
    data_cluster_path: str | None = None  # where rank 0 writes each data cluster's index file
    curriculum_metrics: Mapping[str, CurriculumMetricConfig] = field(
        default_factory=lambda: MappingProxyType({})
    )


@dataclass(frozen=True)
class DataSamplingConfig:
    enabled: bool = False
    num_epochs: int = NUM_EPOCHS_DEFAULT  # the sampler draws num_epochs x len(dataset) samples in all
    num_workers: int = 0  # the curriculum loader's worker processes (replaces num_local_io_workers)
    pin_memory: bool = False  # parsed as DeepSpeed does; its loader pins by deepspeed_io's argument
    curriculum_learning: DataCurriculumConfig = field(default_factory=DataCurriculumConfig)


def parse_data_sampling(block: Block | None, outer_enabled: bool) -> DataSamplingConfig:
    if block is None:
        return DataSamplingConfig()
    enabled = block.take("enabled", False, boolean)
    d = DataSamplingConfig()
    num_epochs = block.take("num_epochs", d.num_epochs, positive_int)
    num_workers = block.take("num_workers", d.num_workers, lambda p, v: integer(p, v, minimum=0))
    pin_memory = block.take("pin_memory", d.pin_memory, boolean)
    if pin_memory:
        warn(
            f"{block.key_path('pin_memory')} has no effect: the loader pins memory by deepspeed_io's "
            "pin_memory argument, as DeepSpeed's does"
        )
    curriculum = _parse_curriculum(block.child("curriculum_learning"))
    _refuse_dynamic_batching(block)
    block.finish()
    if curriculum.enabled and not (enabled and outer_enabled):
        off = "data_efficiency.enabled" if not outer_enabled else "data_efficiency.data_sampling.enabled"
        warn(
            f"{off} is false but data_sampling.curriculum_learning.enabled is true: the curriculum "
            "runs, as in DeepSpeed"
        )
    if enabled and not curriculum.enabled:
        warn(
            "data_efficiency.data_sampling.enabled without curriculum_learning has no effect: DeepSpeed's "
            "engine builds its data sampler only for the curriculum (the ordinary loader runs)"
        )
    return DataSamplingConfig(
        enabled=enabled,
        num_epochs=num_epochs,
        num_workers=num_workers,
        pin_memory=pin_memory,
        curriculum_learning=curriculum,
    )


def _refuse_dynamic_batching(block: Block) -> None:
    sub = block.child("dynamic_batching")
    if sub is None:
        return
    if sub.take("enabled", False, boolean):
        raise fail(
            sub.key_path("enabled"),
            True,
            "dynamic batching is not implemented by zerostep (DeepSpeed 0.19's engine does not act on it "
            "either: its variable_batch_size_and_lr helper builds such a loader by hand); switch it off",
        )
    sub.allow(*sub.raw)  # an off block is not read further


def _parse_curriculum(block: Block | None) -> DataCurriculumConfig:
    if block is None:
        return DataCurriculumConfig()
    if not block.take("enabled", False, boolean):
        block.allow(*block.raw)  # an off block is not read further, as in DeepSpeed
        return DataCurriculumConfig()
    for key in ("data_cluster_path", "curriculum_metrics"):
        if not block.has(key):
            raise fail(
                block.key_path(key),
                None,
                "is required when curriculum_learning is enabled (DeepSpeed reads it)",
            )
    cluster_path = block.take("data_cluster_path", None, optional(text))
    metrics_block = block.child("curriculum_metrics")
    if metrics_block is None or not metrics_block.raw:
        raise fail(
            block.key_path("curriculum_metrics"),
            block.raw.get("curriculum_metrics"),
            "must name at least one metric",
        )
    metrics = {}
    for name in metrics_block.raw:
        if not name or "/" in name or "\x00" in name:
            raise fail(
                metrics_block.key_path(name),
                name,
                "a metric name becomes part of file names: no '/', not empty",
            )
        metrics[name] = _parse_metric(name, metrics_block.child(name))
    metrics_block.finish()
    block.finish()
    return DataCurriculumConfig(
        enabled=True, data_cluster_path=cluster_path, curriculum_metrics=MappingProxyType(metrics)
    )


def _parse_metric(name: str, block: Block | None) -> CurriculumMetricConfig:
    if block is None:
        raise ConfigError(
            "data_efficiency.data_sampling.curriculum_learning.curriculum_metrics."
            f"{name}: must be a JSON object"
        )
    for key in ("difficulty_type", "clustering_type", "min_difficulty", "max_difficulty", "schedule_type"):
        if not block.has(key):
            raise fail(block.key_path(key), None, "is required (DeepSpeed's data sampler reads it)")
    kind = block.take("difficulty_type", "value", choice(DIFFICULTY_TYPES, case_insensitive=False))
    clustering = block.take(
        "clustering_type", "schedule_based", choice(CLUSTERING_TYPES, case_insensitive=False)
    )
    sample_path = block.take("index_to_sample_path", None, optional(text))
    metric_path = block.take("index_to_metric_path", None, optional(text))
    needed = ["index_to_sample_path"] if clustering == "schedule_based" else []
    if clustering == "schedule_based" and kind == "value":
        needed.append("index_to_metric_path")
    for key in needed:
        if block.raw.get(key) is None:
            raise fail(block.key_path(key), None, f"is required for a {clustering} {kind}-based metric")
    for key in ("index_to_sample_path", "index_to_metric_path"):
        if block.raw.get(key) is not None and key not in needed:
            warn(
                f"{block.key_path(key)} has no effect: a {clustering} {kind}-based metric does not read it "
                "(as in DeepSpeed)"
            )
    schedule = parse_metric_schedule(block, kind)
    block.finish()
    return CurriculumMetricConfig(
        index_to_sample_path=sample_path,
        index_to_metric_path=metric_path,
        difficulty_type=kind,
        clustering_type=clustering,
        **schedule,
    )


def parse_metric_schedule(block: Block, kind: str) -> dict[str, Any]:
    """``min_difficulty``, ``max_difficulty``, ``schedule_type`` and ``schedule_config`` (frozen), checked
    as the legacy curriculum's are, plus ``custom`` and difficulties kept within [min, max]."""
    minimum = 0 if kind == "percentile" else None
    low = block.take("min_difficulty", 0, lambda p, v: integer(p, v, minimum=minimum))
    high = block.take("max_difficulty", 0, lambda p, v: integer(p, v, minimum=minimum))
    if high < low:
        raise fail(block.key_path("max_difficulty"), high, f"must be >= min_difficulty ({low})")
    if kind == "percentile" and high < 1:
        raise fail(
            block.key_path("max_difficulty"),
            high,
            "a percentile-based metric's maximum must be >= 1 (it stands for all the data)",
        )
    schedule = block.take("schedule_type", "fixed_linear", choice(SCHEDULE_TYPES, case_insensitive=False))
    config: dict[str, Any] = {"min_difficulty": low, "max_difficulty": high, "schedule_type": schedule}
    sc = block.child("schedule_config")
    if schedule == "custom":
        if sc is not None and sc.raw:
            warn(f"{sc.path} has no effect for schedule_type custom (the function decides the difficulty)")
        if sc is not None:
            sc.allow(*sc.raw)
        return {**config, "schedule_config": MappingProxyType({})}
    if sc is None:
        raise fail(block.key_path("schedule_config"), None, f"is required for schedule_type {schedule!r}")
    if schedule == "fixed_discrete":
        for key in ("difficulty", "max_step"):
            if not sc.has(key):
                raise fail(sc.key_path(key), None, "is required for schedule_type fixed_discrete")
        difficulty = sc.take("difficulty", (), integer_list(minimum))
        max_step = sc.take("max_step", (), integer_list(1, "steps"))
        sc.finish()
        if len(difficulty) != len(max_step) + 1:
            raise fail(
                sc.key_path("difficulty"),
                list(difficulty),
                f"needs one more entry than max_step ({len(max_step)})",
            )
        if list(max_step) != sorted(max_step):
            raise fail(sc.key_path("max_step"), list(max_step), "must be increasing")
        for i, value in enumerate(difficulty):
            if not low <= value <= high:
                raise fail(
                    f"{sc.key_path('difficulty')}[{i}]",
                    value,
                    f"must be within [min_difficulty, max_difficulty] = [{low}, {high}]",
                )
        return {
            **config,
            "schedule_config": MappingProxyType({"difficulty": difficulty, "max_step": max_step}),
        }
    total, step, degree = read_stepped_schedule(sc, schedule)
    sc_values = {"total_curriculum_step": total, "difficulty_step": step}
    if schedule == "fixed_root":
        sc_values["root_degree"] = degree
    return {**config, "schedule_config": MappingProxyType(sc_values)}
