"""DeepSpeed's memory-mapped index files at DeepSpeed's path (the format: zerostep/io/indexed_dataset.py)."""

from zerostep.io.indexed_dataset import (
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)

__all__ = ["MMapIndexedDataset", "MMapIndexedDatasetBuilder", "data_file_path", "index_file_path"]
