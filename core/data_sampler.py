"""DeepSpeed's ``DeepSpeedDataSampler``: the metric-based curriculum's batch sampler (DeepSpeed 0.19,
runtime/data_pipeline/data_sampling/data_sampler.py), rebuilt deterministic and resumable.

Per global batch (``micro x dp x gas`` samples) the ``curriculum_step`` advances by one and every
metric's ``CurriculumScheduler`` updates its difficulty. When a difficulty changes, a new *data
cluster* joins: the samples that became eligible, read from the metric's index files (DeepSpeed's
``DataAnalyzer`` output, or zerostep's, core/data_analyzer.py):

- ``value`` difficulty: the samples whose metric is in ``(previous, current]`` (``<= current`` first);
- ``percentile``: the rows' samples in ascending metric order, positions ``[previous, current) x
  (N // max_difficulty)`` (to the end at ``max_difficulty``);
- several ``schedule_based`` metrics: the samples within every metric's difficulty, minus the earlier
  clusters; only ``single_cluster`` metrics: one cluster of every sample (the difficulty is then only
  reported, e.g. to a post-process function that truncates sequences).

A global batch draws, for each of its samples, a cluster with probability proportional to its size,
takes that many samples in order from each cluster's shuffled order (reshuffled once used up), and
shuffles the batch. It is split into ``gas`` rounds of ``micro x dp`` and each round over the ranks
(rank ``r`` gets ``[round(r x len / dp), round((r + 1) x len / dp))``), as DeepSpeed does.

Differences from DeepSpeed, each on purpose:

- Randomness: the draws of global batch ``s`` come from a generator seeded by ``(seed, s)``, and a
  cluster's ``k``-th shuffle from ``(seed, cluster, k)``: every rank computes the same batches without
  a broadcast (so every rank reads the index files), and the state to resume is a few integers.
  DeepSpeed's single numpy generator lives on rank 0, and its ``state_dict`` saves numpy's *global*
  generator, not that one, so its resumed run draws other batches.
- Cluster files: rank 0 writes each new cluster (in its first shuffled order) to ``data_cluster_path``
  under DeepSpeed's names; a resume recomputes clusters from the index files, it does not read them.
- ``consumed_samples`` counts a round when it is handed out (DeepSpeed counts it when the next is
  asked for, so a checkpoint after a step missed the step's last round); ``len()`` is the number of
  micro-batches this rank yields (DeepSpeed's is the number of samples of all epochs). Global batches
  are always full, so ``drop_last`` never drops anything.

As with DeepSpeed's, a loader with worker processes (``data_sampling.num_workers > 0``) asks for batches
ahead of training, so a state saved after a step is ahead by the prefetched micro-batches; with the
default 0 it is exact.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from zerostep.core.config.data_sampling import CurriculumMetricConfig
from zerostep.core.curriculum_scheduler import CurriculumScheduler
from zerostep.io.indexed_dataset import IndexedFileError, MMapIndexedDataset, find_fit_int_dtype, write_items

CLUSTER_PREFIX = "cluster"  # DeepSpeed's CURRICULUM_LEARNING_CLUSTER_PREFIX


def derived_seed(*keys: Any) -> int:
    """A 63-bit seed from ``keys`` (stable across processes and runs, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(*keys: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*keys))


class MetricIndex:
    """One ``schedule_based`` metric's index files in memory: every sample of the rows in row order
    (ascending metric), and for a value-based metric each of those samples' metric value."""

    def __init__(self, name: str, metric: CurriculumMetricConfig, num_samples: int) -> None:
        self.name, self.metric = name, metric
        rows = _open(name, metric, "index_to_sample_path")
        self.samples, offsets = rows.flat()  # int64 [total], int64 [rows + 1]
        where = f"curriculum metric {name!r}: {metric.index_to_sample_path}"
        if self.samples.numel() and (int(self.samples.min()) < 0 or int(self.samples.max()) >= num_samples):
            raise ValueError(
                f"{where} holds sample index {int(self.samples.max())} (or a negative one), but the dataset "
                f"has {num_samples} samples: the index files belong to another dataset"
            )
        self.values: torch.Tensor | None = None
        if metric.difficulty_type == "value":
            values = _open(name, metric, "index_to_metric_path")
            flat, voff = values.flat()
            if len(values) != len(rows) or not torch.all(voff.diff() == 1):
                raise ValueError(
                    f"curriculum metric {name!r}: {metric.index_to_metric_path} must hold one value "
                    f"per row of {metric.index_to_sample_path} ({len(rows)} rows; it has {len(values)} "
                    "rows)"
                )
            self.values = flat.repeat_interleave(offsets.diff())  # int64 [total]: each sample's value

    def by_value(self, low: float | None, high: int) -> torch.Tensor:
        """Samples whose metric is in ``(low, high]`` (``low`` None: no lower bound)."""
        assert self.values is not None
        mask = self.values <= high
        if low is not None:
            mask &= self.values > low
        return self.samples[mask]

    def by_percentile(self, start: int, end: int) -> torch.Tensor:
        """The samples at positions ``[start, end) x (N // max_difficulty)`` of the ascending order."""
        total, top = self.samples.numel(), self.metric.max_difficulty
        per = total // top
        stop = total if end >= top else per * end
        return self.samples[per * max(start, 0) : stop]

    def within(self, difficulty: int) -> torch.Tensor:
        """Samples within ``difficulty`` from the start (value ``<=``, or the first percentiles)."""
        if self.metric.difficulty_type == "value":
            return self.by_value(None, difficulty)
        return self.by_percentile(0, difficulty)


def _open(name: str, metric: CurriculumMetricConfig, key: str) -> MMapIndexedDataset:
    path = getattr(metric, key)
    try:
        return MMapIndexedDataset(path)
    except IndexedFileError as e:
        raise FileNotFoundError(
            f"curriculum metric {name!r}: {key} = {path!r} cannot be read ({e}); write the index "
            "files with DataAnalyzer (zerostep.runtime.data_pipeline.data_sampling.data_analyzer)"
        ) from e


class DeepSpeedDataSampler:
    """A batch sampler: iterating yields this rank's micro-batches of sample indices (DeepSpeed's
    constructor; ``data_efficiency_config`` is zerostep's parsed ``DataEfficiencyConfig``, a ``Config``,
    or DeepSpeed's ``data_efficiency`` dict; ``data_parallel_group`` is accepted and not needed)."""

    def __init__(
        self,
        data_efficiency_config: Any,
        one_epoch_total_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        data_parallel_group: Any = None,
        gradient_accumulation_steps: int = 1,
        global_rank: int = 0,
        drop_last: bool = True,
    ) -> None:
        config = _data_efficiency(data_efficiency_config)
        curriculum = config.data_sampling.curriculum_learning
        if not curriculum.enabled:
            raise ValueError(
                "DeepSpeedDataSampler needs data_efficiency.data_sampling.curriculum_learning enabled "
                "(DeepSpeed's engine builds it only for the curriculum)"
            )
        for name, value in (
            ("micro_batch_size", micro_batch_size),
            ("data_parallel_size", data_parallel_size),
            ("gradient_accumulation_steps", gradient_accumulation_steps),
        ):
            if value < 1:
                raise ValueError(f"{name} = {value} must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank = {data_parallel_rank} must be in [0, {data_parallel_size})"
            )
        if one_epoch_total_samples < 1:
            raise ValueError(f"the dataset has {one_epoch_total_samples} samples: nothing to sample")
        self.data_efficiency_config = config
        self.seed = config.seed
        self.one_epoch_total_samples = one_epoch_total_samples
        self.total_samples = one_epoch_total_samples * config.data_sampling.num_epochs
        self.index_dtype = find_fit_int_dtype(0, one_epoch_total_samples)
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.data_parallel_group = data_parallel_group
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.global_batch_size = self.micro_batch_times_data_parallel_size * gradient_accumulation_steps
        self.global_rank = global_rank
        self.drop_last = drop_last
        self.cluster_root = curriculum.data_cluster_path
        self.metrics = curriculum.curriculum_metrics
        self.curriculum_schedulers = {n: CurriculumScheduler(m.schedule, n) for n, m in self.metrics.items()}
        self.difficulty_type = {n: m.difficulty_type for n, m in self.metrics.items()}
        self.clustering_type = {n: m.clustering_type for n, m in self.metrics.items()}
        self._index = {
            n: MetricIndex(n, m, one_epoch_total_samples) for n, m in self.metrics.items() if m.clusters
        }
        self._reset()

    def _reset(self) -> None:
        self.batch: list[int] = []
        self.consumed_samples = 0
        self.curriculum_step = 0
        self.current_difficulties: dict[str, int] = {}
        self.data_cluster_paths: list[str] = []  # cluster names (files under data_cluster_path)
        self.data_cluster_current_position: list[int] = []
        self.data_cluster_sizes: list[int] = []
        self._cluster_bounds: list[list[dict[str, int | None]]] = []  # [previous, current] difficulties
        self._cluster_shuffles: list[int] = []
        self._cluster_members: list[torch.Tensor] = []  # int64, before shuffling
        self._cluster_orders: list[torch.Tensor] = []  # int64, the current shuffled order

    # ------------------------------------------------------------------ DeepSpeed's surface

    def __len__(self) -> int:
        """Micro-batches this rank yields in all (``num_epochs x len(dataset)`` samples, whole batches)."""
        batches = -(-self.total_samples // self.global_batch_size)
        return batches * self.gradient_accumulation_steps

    def set_custom_curriculum_learning_schedule(self, schedule_func_dict: Mapping[str, Callable]) -> None:
        """``{metric: fn(curriculum_step) -> difficulty}`` for metrics of ``schedule_type`` custom."""
        for name, fn in schedule_func_dict.items():
            scheduler = self.curriculum_schedulers.get(name)
            if scheduler is None:
                raise KeyError(
                    f"set_custom_curriculum_learning_schedule: unknown curriculum metric {name!r}; the "
                    f"config's metrics are {', '.join(self.curriculum_schedulers)}"
                )
            if scheduler.config.schedule_type != "custom":
                raise ValueError(
                    f"set_custom_curriculum_learning_schedule: metric {name!r} has schedule_type "
                    f"{scheduler.config.schedule_type!r}; a function applies to schedule_type custom only"
                )
            scheduler.set_custom_get_difficulty(fn)

    def get_current_difficulty(self, metric: str) -> int:
        """The difficulty of ``metric`` for the latest global batch (its min_difficulty before the first)."""
        scheduler = self.curriculum_schedulers.get(metric)
        if scheduler is None:
            raise KeyError(
                f"unknown curriculum metric {metric!r}; known: {', '.join(self.curriculum_schedulers)}"
            )
        return scheduler.get_current_difficulty()

    def get_start_end_idx(self, batch_len: int | None = None) -> tuple[int, int]:
        """This rank's ``[start, end)`` within a round of ``batch_len`` samples."""
        n = batch_len or self.micro_batch_times_data_parallel_size
        dp, r = self.data_parallel_size, self.data_parallel_rank
        return round(r * n / dp), round((r + 1) * n / dp)

    def __iter__(self) -> Iterator[list[int]]:
        per_round = self.micro_batch_times_data_parallel_size
        while True:
            if not self.batch:
                if self.consumed_samples >= self.total_samples:
                    return
                self.get_next_global_batch()
            current, self.batch = self.batch[:per_round], self.batch[per_round:]
            self.consumed_samples += len(current)
            start, end = self.get_start_end_idx(len(current))
            yield current[start:end]

    def get_next_global_batch(self) -> None:
        self.curriculum_step += 1
        previous = dict(self.current_difficulties)
        changed = False
        for name, scheduler in self.curriculum_schedulers.items():
            value = scheduler.update_difficulty(self.curriculum_step)
            changed |= self.current_difficulties.get(name) != value
            self.current_difficulties[name] = value
        if changed:
            self._add_cluster(
                [{m: previous.get(m) for m in self.current_difficulties}, dict(self.current_difficulties)]
            )
        if not self._cluster_orders:
            raise ValueError(
                f"curriculum step {self.curriculum_step}: no sample is within the difficulties "
                f"{self.current_difficulties}; raise min_difficulty (or check the index files)"
            )
        self.batch = self._draw(self.curriculum_step).tolist()

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position (small: integers and the current global batch's remainder)."""
        return {
            "batch": list(self.batch),
            "consumed_samples": self.consumed_samples,
            "curriculum_step": self.curriculum_step,
            "current_difficulties": dict(self.current_difficulties),
            "data_cluster_paths": list(self.data_cluster_paths),
            "data_cluster_current_position": list(self.data_cluster_current_position),
            "data_cluster_difficulties": [[dict(p), dict(c)] for p, c in self._cluster_bounds],
            "data_cluster_shuffles": list(self._cluster_shuffles),
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``: the clusters are recomputed from the index files and the seed."""
        if "data_cluster_difficulties" not in state_dict:
            raise ValueError(
                "load_state_dict: not a zerostep data sampler state (DeepSpeed's keeps its clusters in "
                "files and its generator state; it has no data_cluster_difficulties)"
            )
        unknown = set(state_dict["current_difficulties"]) ^ set(self.curriculum_schedulers)
        if unknown:
            raise ValueError(
                f"load_state_dict: the saved curriculum metrics {sorted(state_dict['current_difficulties'])} "
                f"differ from the config's {sorted(self.curriculum_schedulers)}"
            )
        saved_seed = int(state_dict.get("seed", self.seed))
        if saved_seed != self.seed:
            warnings.warn(
                f"load_state_dict: the saved data sampler used seed {saved_seed}, the config {self.seed}; "
                "the saved seed is kept so that the run continues its batches",
                stacklevel=2,
            )
        self._reset()
        self.seed = saved_seed
        for bounds, shuffles, position in zip(
            state_dict["data_cluster_difficulties"],
            state_dict["data_cluster_shuffles"],
            state_dict["data_cluster_current_position"],
        ):
            if not self._add_cluster([dict(bounds[0]), dict(bounds[1])], write=False):
                raise ValueError(f"load_state_dict: cluster {bounds} is empty with these index files")
            self._cluster_shuffles[-1] = int(shuffles)
            self._cluster_orders[-1] = self._shuffled(len(self._cluster_orders) - 1)
            self.data_cluster_current_position[-1] = int(position)
        for name, value in state_dict["current_difficulties"].items():
            self.curriculum_schedulers[name].set_current_difficulty(int(value))
        self.current_difficulties = {k: int(v) for k, v in state_dict["current_difficulties"].items()}
        self.batch = [int(i) for i in state_dict["batch"]]
        self.consumed_samples = int(state_dict["consumed_samples"])
        self.curriculum_step = int(state_dict["curriculum_step"])

    # ------------------------------------------------------------------ clusters

    def _members(self, previous: Mapping[str, int | None], current: Mapping[str, int]) -> torch.Tensor:
        """The samples of a new cluster (int64, before shuffling); may be empty."""
        n = self.one_epoch_total_samples
        clustering = [(name, m) for name, m in self.metrics.items() if m.clusters]
        if len(clustering) > 1:
            keep = torch.ones(n, dtype=torch.bool)
            for name, _ in clustering:
                inside = torch.zeros(n, dtype=torch.bool)
                inside[self._index[name].within(current[name])] = True
                keep &= inside
            for members in self._cluster_members:
                keep[members] = False
            return keep.nonzero().flatten()
        if len(clustering) == 1:
            name, m = clustering[0]
            index, low = self._index[name], previous.get(name)
            if m.difficulty_type == "value":
                return index.by_value(low, current[name])
            return index.by_percentile(0 if low is None else low, current[name])
        if self._cluster_members:
            return torch.zeros(0, dtype=torch.int64)
        return torch.arange(n, dtype=torch.int64)

    def _add_cluster(self, bounds: list[dict[str, int | None]], write: bool = True) -> bool:
        members = self._members(bounds[0], bounds[1])
        if members.numel() == 0:
            return False
        name = CLUSTER_PREFIX + "".join(f"_{m}{bounds[1][m]}" for m in self.curriculum_schedulers)
        self._cluster_bounds.append(bounds)
        self._cluster_members.append(members)
        self._cluster_shuffles.append(0)
        self._cluster_orders.append(self._shuffled(len(self._cluster_members) - 1))
        self.data_cluster_paths.append(name)
        self.data_cluster_current_position.append(0)
        self.data_cluster_sizes.append(int(members.numel()))
        if write and self.global_rank == 0 and self.cluster_root:
            os.makedirs(self.cluster_root, exist_ok=True)
            write_items(os.path.join(self.cluster_root, name), [self._cluster_orders[-1]], self.index_dtype)
        return True

    def _shuffled(self, cidx: int) -> torch.Tensor:
        members = self._cluster_members[cidx]
        g = _generator(self.seed, "cluster", cidx, self._cluster_shuffles[cidx])
        return members[torch.randperm(members.numel(), generator=g)]

    def _take(self, cidx: int, count: int) -> list[torch.Tensor]:
        """``count`` samples from cluster ``cidx`` in order, reshuffling it whenever it runs out."""
        parts = []
        while count > 0:
            order, pos = self._cluster_orders[cidx], self.data_cluster_current_position[cidx]
            if pos >= order.numel():
                self._cluster_shuffles[cidx] += 1
                self._cluster_orders[cidx] = order = self._shuffled(cidx)
                pos = 0
            piece = order[pos : pos + count]
            parts.append(piece)
            count -= piece.numel()
            self.data_cluster_current_position[cidx] = pos + piece.numel()
        return parts

    def _draw(self, step: int) -> torch.Tensor:
        """Global batch ``step``: int64 [global_batch_size] sample indices."""
        g = _generator(self.seed, "batch", step)
        sizes = torch.tensor(self.data_cluster_sizes, dtype=torch.float64)
        picks = torch.multinomial(sizes / sizes.sum(), self.global_batch_size, replacement=True, generator=g)
        counts = torch.bincount(picks, minlength=len(self.data_cluster_sizes)).tolist()
        parts = [p for cidx, c in enumerate(counts) for p in self._take(cidx, c)]
        batch = torch.cat(parts)
        return batch[torch.randperm(batch.numel(), generator=g)]


def _data_efficiency(config: Any) -> Any:
    """``DataEfficiencyConfig`` from itself, a ``Config``, or DeepSpeed's ``data_efficiency`` dict."""
    from zerostep.core.config.data_efficiency import DataEfficiencyConfig, parse_data_efficiency
    from zerostep.core.config.values import Block, Context

    if isinstance(config, DataEfficiencyConfig):
        return config
    inner = getattr(config, "data_efficiency", None)
    if isinstance(inner, DataEfficiencyConfig):
        return inner
    if isinstance(config, Mapping):
        return parse_data_efficiency(Block(config, "data_efficiency", Context(lambda path: "user")))
    raise TypeError(
        "data_efficiency_config must be a zerostep Config, its data_efficiency, or DeepSpeed's "
        f"data_efficiency dict; got {type(config).__name__}"
    )


class StepBatchSampler:
    """The sampler's micro-batches grouped by optimizer step: this rank's ``micro x gas`` indices, its
    micro-batches in order, which is the batch ``zerostep.core``'s ``engine.step`` takes."""

    def __init__(self, sampler: DeepSpeedDataSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.gradient_accumulation_steps

    def __iter__(self) -> Iterator[list[int]]:
        step: list[int] = []
        for micro in self.sampler:
            step.extend(micro)
            if not self.sampler.batch:  # the global batch's last round: the step is complete
                yield step
                step = []
