"""DeepSpeed's ``data_sampling.utils`` helpers (zerostep/io/indexed_dataset.py, core/data_analyzer.py)."""

from zerostep.core.data_analyzer import split_index
from zerostep.io.indexed_dataset import (
    close_mmap_dataset_builder,
    create_mmap_dataset_builder,
    find_fit_int_dtype,
)

__all__ = ["close_mmap_dataset_builder", "create_mmap_dataset_builder", "find_fit_int_dtype", "split_index"]
