"""DeepSpeed's ``DataAnalyzer`` (runtime/data_pipeline/data_sampling/data_analyzer.py): a map/reduce of
per-sample metric values over a dataset into the index files the curriculum's data sampler reads.

Map: the dataset is split over ``num_workers`` (one ``DataAnalyzer`` per worker, ``worker_id``), each
worker's share over ``num_threads`` parts; each part is read in order in batches of ``batch_size``
(``collate_fn``), every ``metric_functions[i](batch)`` returns one integer per sample
(``single_value_per_sample``: shape ``[batch]``) or a tensor summed over the data
(``accumulate_value_over_samples``), of dtype ``metric_dtypes[i]``. A sample's index is its position in
the dataset, or ``batch["index"][row][0]`` when the batch is a dict with an ``index`` field (Megatron),
or ``sample_indices[position]``. Each part writes, under ``<save_path>/<metric>/worker<w>_thread<t>/``,
``<metric>_sample_to_metric`` (its samples' values) and ``<metric>_sample_index`` (their indices; DeepSpeed
writes per-value CSV files instead), or ``<metric>_metric_value``.

Reduce (worker 0, after every worker's map): under ``<save_path>/<metric>/``, in DeepSpeed's names and
its memory-mapped format (zerostep.io.indexed_dataset), so its sampler and Megatron-DeepSpeed read them:

    <metric>_sample_to_metric              row i: the value of sample i (DeepSpeed's: in map order)
    <metric>_index_to_sample               one row per distinct value, ascending: the samples with it
    <metric>_index_to_metric               the same rows: the value
    <metric>_index_to_sample_percentile_merged   the rows merged by max(1, rows // 100)
    <metric>_metric_value                  accumulate_value_over_samples: the sum

Differences: the parts of one worker run one after another in this process, and the reduce runs in
one process whatever ``num_threads_reduce`` says (DeepSpeed starts a process per part and per reduce
thread); a reduce that does not find every sample exactly once is an error naming the counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, Subset

from zerostep.io.indexed_dataset import (
    MMapIndexedDataset,
    _as_dtype,
    find_fit_int_dtype,
    write_flat,
)

METRIC_TYPES = ("single_value_per_sample", "accumulate_value_over_samples")


def split_index(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` in ``parts`` contiguous pieces whose sizes differ by at most one."""
    bounds = [start + (i * (end - start)) // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class DataAnalyzer:
    """DeepSpeed's constructor; ``run_map``, ``run_reduce``, ``run_map_reduce`` as there."""

    def __init__(
        self,
        dataset: Any,
        num_workers: int = 1,
        worker_id: int = 0,
        num_threads: int = 1,
        num_threads_reduce: int = 1,
        specific_threads: Sequence[int] = (),
        batch_size: int = 1,
        metric_names: Sequence[str] = (),
        metric_functions: Sequence[Callable[[Any], Any]] = (),
        metric_types: Sequence[str] = (),
        metric_dtypes: Sequence[Any] = (),
        save_path: str | os.PathLike = "./",
        collate_fn: Callable | None = None,
        custom_map_init: Callable | None = None,
        custom_map_update: Callable | None = None,
        custom_map_finalize: Callable | None = None,
        custom_reduce: Callable | None = None,
        sample_indices: Sequence[int] | None = None,
    ) -> None:
        lengths = {len(metric_names), len(metric_functions), len(metric_types), len(metric_dtypes)}
        if len(lengths) != 1:
            raise ValueError(
                "DataAnalyzer: metric_names, metric_functions, metric_types and metric_dtypes must have one "
                f"entry per metric (lengths {len(metric_names)}, {len(metric_functions)}, "
                f"{len(metric_types)}, {len(metric_dtypes)})"
            )
        for name, kind in zip(metric_names, metric_types):
            if kind not in METRIC_TYPES:
                raise ValueError(
                    f"DataAnalyzer: metric {name!r} has type {kind!r}; use one of {METRIC_TYPES}"
                )
        if not 0 <= worker_id < num_workers or num_threads < 1 or batch_size < 1:
            raise ValueError(
                f"DataAnalyzer: worker_id {worker_id} must be in [0, num_workers = {num_workers}); "
                f"num_threads ({num_threads}) and batch_size ({batch_size}) >= 1"
            )
        self.dataset = dataset
        self.num_workers = num_workers
        self.worker_id = worker_id
        self.num_threads = num_threads
        self.num_threads_reduce = num_threads_reduce  # the reduce runs in one process here
        self.specific_threads = list(specific_threads)
        self.batch_size = batch_size
        self.metric_names = list(metric_names)
        self.metric_functions = list(metric_functions)
        self.metric_types = list(metric_types)
        self.metric_dtypes = [_as_dtype(d) for d in metric_dtypes]
        self.save_path = os.fspath(save_path)
        self.collate_fn = collate_fn
        self.custom_map_init = custom_map_init
        self.custom_map_update = custom_map_update
        self.custom_map_finalize = custom_map_finalize
        self.custom_reduce = custom_reduce
        self.sample_indices = sample_indices

    # ------------------------------------------------------------------ map

    def _part_dir(self, metric: str, worker: int, thread: int) -> str:
        return os.path.join(self.save_path, metric, f"worker{worker}_thread{thread}")

    def init_metric_results(self, thread_id: int, *_: Any) -> list[dict[str, Any]]:
        """Per metric: the lists one part fills (values and indices, or the running sum)."""
        results = []
        for name, kind in zip(self.metric_names, self.metric_types):
            os.makedirs(self._part_dir(name, self.worker_id, thread_id), exist_ok=True)
            if kind == "single_value_per_sample":
                results.append({"thread": thread_id, "values": [], "indices": []})
            else:
                results.append({"thread": thread_id, "metric_value": None})
        return results

    def update_metric_results(
        self,
        data: Any,
        metric_types: Any,
        metric_dtypes: Any,
        metric_functions: Any,
        metric_results: Any,
        batch_start_idx: int = 0,
    ) -> int:
        """Apply every metric function to one batch; returns the batch's sample count."""
        count = 0
        for name, kind, dtype, fn, result in zip(
            self.metric_names, metric_types, metric_dtypes, metric_functions, metric_results
        ):
            values = fn(data)
            if not isinstance(values, torch.Tensor):
                if not hasattr(values, "__array__"):
                    raise TypeError(
                        f"metric {name!r}: the function must return a tensor or array, got "
                        f"{type(values).__name__}"
                    )
                values = torch.as_tensor(values)
            if values.dtype != dtype:
                raise TypeError(
                    f"metric {name!r}: the function returned {values.dtype}, metric_dtypes says {dtype}"
                )
            if kind == "accumulate_value_over_samples":
                total = result["metric_value"]
                result["metric_value"] = values.clone() if total is None else total + values
                continue
            values = values.reshape(values.shape[0], -1) if values.dim() else values.reshape(1, 1)
            if values.shape[1] != 1:
                raise ValueError(
                    f"metric {name!r}: single_value_per_sample needs one value per sample, got shape "
                    f"{tuple(values.shape)}"
                )
            count = values.shape[0]
            result["values"].append(values.reshape(-1).to(torch.int64))
            result["indices"].append(self._sample_indices(data, batch_start_idx, count))
        return count

    def _sample_indices(self, data: Any, start: int, count: int) -> torch.Tensor:
        if isinstance(data, dict) and "index" in data:
            return torch.as_tensor(data["index"]).reshape(count, -1)[:, 0].to(torch.int64)
        positions = torch.arange(start, start + count, dtype=torch.int64)
        if self.sample_indices is not None:
            return torch.as_tensor([self.sample_indices[i] for i in positions.tolist()], dtype=torch.int64)
        return positions

    def finalize_metric_results(self, metric_types: Any, metric_dtypes: Any, metric_results: Any) -> None:
        for name, kind, dtype, result in zip(self.metric_names, metric_types, metric_dtypes, metric_results):
            where = os.path.join(self._part_dir(name, self.worker_id, result["thread"]), name)
            if kind == "single_value_per_sample":
                values = (
                    torch.cat(result["values"]) if result["values"] else torch.zeros(0, dtype=torch.int64)
                )
                indices = (
                    torch.cat(result["indices"]) if result["indices"] else torch.zeros(0, dtype=torch.int64)
                )
                write_flat(f"{where}_sample_to_metric", values, torch.ones_like(values), dtype)
                write_flat(f"{where}_sample_index", indices, torch.ones_like(indices), torch.int64)
            elif result["metric_value"] is not None:
                value = result["metric_value"].reshape(-1)
                write_flat(f"{where}_metric_value", value, torch.tensor([value.numel()]), dtype)

    def run_map_helper(self, thread_id: int) -> None:
        start, end = self.thread_splits[thread_id]
        part = Subset(self.dataset, list(range(start, end)))
        batches = BatchSampler(SequentialSampler(part), batch_size=self.batch_size, drop_last=False)
        kwargs = {} if self.collate_fn is None else {"collate_fn": self.collate_fn}
        loader = DataLoader(part, batch_sampler=batches, num_workers=0, **kwargs)
        args = (self.metric_names, self.metric_types, self.metric_dtypes, self.save_path, self.worker_id)
        results = (self.custom_map_init or self.init_metric_results)(thread_id, *args)
        update = self.custom_map_update or self.update_metric_results
        done = 0
        for data in loader:
            counted = update(
                data, self.metric_types, self.metric_dtypes, self.metric_functions, results, start + done
            )
            done += counted if isinstance(counted, int) and counted > 0 else _batch_len(data)
        (self.custom_map_finalize or self.finalize_metric_results)(
            self.metric_types, self.metric_dtypes, results
        )

    def run_map(self) -> None:
        """This worker's parts, one after another."""
        self.worker_splits = split_index(0, len(self.dataset), self.num_workers)
        self.thread_splits = split_index(*self.worker_splits[self.worker_id], self.num_threads)
        for thread in self.specific_threads or range(self.num_threads):
            self.run_map_helper(thread)

    # ------------------------------------------------------------------ reduce

    def run_reduce(self) -> None:
        if self.custom_reduce is not None:
            self.custom_reduce(
                self.dataset,
                self.metric_names,
                self.metric_types,
                self.save_path,
                self.num_workers,
                self.num_threads,
                self.num_threads_reduce,
            )
            return
        for name, kind in zip(self.metric_names, self.metric_types):
            if kind == "single_value_per_sample":
                self._reduce_single(name)
            else:
                self._reduce_accumulate(name)

    def _parts(self, name: str, suffix: str) -> list[torch.Tensor]:
        out = []
        for w in range(self.num_workers):
            for t in range(self.num_threads):
                prefix = os.path.join(self._part_dir(name, w, t), f"{name}_{suffix}")
                if not MMapIndexedDataset.exists(prefix):
                    raise FileNotFoundError(
                        f"DataAnalyzer reduce: {prefix}.bin/.idx is missing: map worker {w} part {t} did not "
                        "finish (run_map on every worker before run_reduce)"
                    )
                out.append(MMapIndexedDataset(prefix).flat()[0])
        return out

    def _reduce_single(self, name: str) -> None:
        values = torch.cat(self._parts(name, "sample_to_metric"))
        indices = torch.cat(self._parts(name, "sample_index"))
        n = len(self.dataset)
        complete = values.numel() == n and indices.numel() == n
        if complete and n:
            inside = int(indices.min()) >= 0 and int(indices.max()) < n
            complete = inside and bool(torch.bincount(indices, minlength=n).eq(1).all())
        if not complete:
            raise ValueError(
                f"DataAnalyzer reduce, metric {name!r}: the map results hold {values.numel()} samples for a "
                f"dataset of {n}, not each sample once (a map worker did not finish, or indices repeat)"
            )
        out = os.path.join(self.save_path, name, name)
        value_dtype = find_fit_int_dtype(int(values.min()), int(values.max()))
        by_sample = torch.empty(n, dtype=torch.int64)
        by_sample[indices] = values
        write_flat(f"{out}_sample_to_metric", by_sample, torch.ones(n, dtype=torch.int64), value_dtype)
        order = torch.sort(values, stable=True).indices  # ties keep map order, as DeepSpeed's rows do
        distinct, counts = torch.unique_consecutive(values[order], return_counts=True)
        samples = indices[order]
        index_dtype = find_fit_int_dtype(0, n - 1)
        write_flat(f"{out}_index_to_sample", samples, counts, index_dtype)
        write_flat(f"{out}_index_to_metric", distinct, torch.ones_like(distinct), value_dtype)
        step = max(1, distinct.numel() // 100)
        merged = torch.stack([c.sum() for c in counts.split(step)])
        write_flat(f"{out}_index_to_sample_percentile_merged", samples, merged, index_dtype)

    def _reduce_accumulate(self, name: str) -> None:
        parts = self._parts(name, "metric_value")
        total = torch.stack(parts).sum(0)
        dtype = find_fit_int_dtype(int(total.min()), int(total.max()))
        write_flat(
            os.path.join(self.save_path, name, f"{name}_metric_value"),
            total,
            torch.tensor([total.numel()]),
            dtype,
        )

    def run_map_reduce(self, comm_group: Any = None) -> None:
        """Map on every worker, then worker 0 reduces; with torch.distributed up, barriers between."""
        self.run_map()
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.barrier(group=comm_group)
        if self.worker_id == 0:
            self.run_reduce()
        if distributed:
            dist.barrier(group=comm_group)


def _batch_len(data: Any) -> int:
    """Samples in a collated batch: the leading dimension of its first tensor (a dict's ``len`` is its
    key count, which DeepSpeed's map mistakes for it)."""
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    if isinstance(data, dict):
        data = list(data.values())
    if isinstance(data, (list, tuple)) and data:
        return _batch_len(data[0])
    return len(data)
