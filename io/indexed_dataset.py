"""Megatron's memory-mapped indexed files (``<prefix>.bin`` + ``<prefix>.idx``), as DeepSpeed's data
efficiency library reads and writes them (``data_sampling/indexed_dataset.py``).

A file pair holds a list of one-dimensional integer arrays ("items"); DeepSpeed's ``DataAnalyzer``
writes its metric index files in it and ``DeepSpeedDataSampler`` reads them. zerostep implements the
format from its layout, so files written by DeepSpeed load here and files written here load in
DeepSpeed:

    <prefix>.bin   the items' elements, back to back, little-endian, in the file's dtype
    <prefix>.idx   b"MMIDIDX\\x00\\x00"  <u64 version = 1>  <u8 dtype code>
                   <u64 n_items>  <u64 n_docs>
                   sizes    int32[n_items]   elements per item
                   pointers int64[n_items]   byte offset of each item in .bin
                   doc_idx  int64[n_docs]    item index where each document starts (0 first)

The dtype codes are DeepSpeed's table (which differs from Megatron-LM's at 6-8): 1 uint8, 2 int8,
3 int16, 4 int32, 5 int64, 6 uint16, 7 uint32, 8 uint64. Reads are ``mmap`` plus ``torch.frombuffer``
(no copy); items come back as torch tensors in the file's dtype (DeepSpeed returns numpy arrays).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from typing import Any

import torch

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.uint16,
    7: torch.uint32,
    8: torch.uint64,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n_items, n_docs


class IndexedFileError(ValueError):
    """An index file pair that is missing, truncated or not in the format; the message names the file."""


def index_file_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".idx"


def data_file_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".bin"


def find_fit_int_dtype(min_value: int, max_value: int) -> torch.dtype:
    """The smallest integer dtype of the table holding ``[min_value, max_value]`` (DeepSpeed's rule:
    unsigned when ``min_value >= 0``)."""
    if min_value >= 0:
        for dtype, top in ((torch.uint8, 255), (torch.uint16, 65535), (torch.uint32, 2**32 - 1)):
            if max_value <= top:
                return dtype
        return torch.uint64
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= min_value and max_value <= info.max:
            return dtype
    return torch.int64


def _as_dtype(dtype: Any) -> torch.dtype:
    """A torch dtype of the table from a torch dtype, a numpy dtype/type or its name."""
    if isinstance(dtype, torch.dtype):
        found = dtype
    else:
        name = getattr(dtype, "__name__", None) or str(getattr(dtype, "name", dtype))
        found = getattr(torch, name.replace("numpy.", ""), None)
    if not isinstance(found, torch.dtype) or found not in CODES:
        names = ", ".join(str(d).replace("torch.", "") for d in CODES)
        raise ValueError(f"dtype {dtype!r} is not an indexed-file dtype; use one of {names}")
    return found


class MMapIndexedDataset(torch.utils.data.Dataset):
    """The items of ``<path>.bin``/``<path>.idx``: ``len()`` items, ``ds[i]`` a 1-D tensor, ``ds[a:b]`` a
    list of them. ``skip_warmup`` is accepted for DeepSpeed's signature (nothing is pre-read here)."""

    def __init__(self, path: str | os.PathLike, skip_warmup: bool = True) -> None:
        self.path = os.fspath(path)
        idx, bin_ = index_file_path(path), data_file_path(path)
        for name in (idx, bin_):
            if not os.path.isfile(name):
                raise IndexedFileError(f"{name}: no such file (an indexed file is a .bin/.idx pair)")
        with open(idx, "rb") as f:
            raw = f.read()
        if len(raw) < _HEADER.size:
            raise IndexedFileError(f"{idx}: {len(raw)} bytes, shorter than the {_HEADER.size}-byte header")
        magic, version, code, n_items, n_docs = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise IndexedFileError(f"{idx}: not a memory-mapped index file (magic {magic!r})")
        if version != VERSION:
            raise IndexedFileError(f"{idx}: version {version}, only version {VERSION} is known")
        if code not in DTYPES:
            raise IndexedFileError(f"{idx}: unknown dtype code {code}")
        need = _HEADER.size + 12 * n_items + 8 * n_docs
        if len(raw) < need:
            raise IndexedFileError(f"{idx}: truncated ({len(raw)} bytes, the header announces {need})")
        self._dtype = DTYPES[code]
        off = _HEADER.size
        buf = bytearray(raw)  # small: one int per item; a writable copy for torch.frombuffer
        self.sizes = (
            torch.frombuffer(buf, dtype=torch.int32, count=n_items, offset=off)
            if n_items
            else (torch.zeros(0, dtype=torch.int32))
        )
        off += 4 * n_items
        self.pointers = (
            torch.frombuffer(buf, dtype=torch.int64, count=n_items, offset=off)
            if n_items
            else torch.zeros(0, dtype=torch.int64)
        )
        off += 8 * n_items
        self.doc_idx = (
            torch.frombuffer(buf, dtype=torch.int64, count=n_docs, offset=off)
            if n_docs
            else torch.zeros(0, dtype=torch.int64)
        )
        itemsize = self._dtype.itemsize
        if n_items and (
            bool((self.sizes < 0).any())
            or bool((self.pointers < 0).any() or (self.pointers % itemsize).any())
        ):
            raise IndexedFileError(
                f"{idx}: negative sizes or offsets, or offsets not at {self._dtype} elements"
            )
        # items may lie in any order in .bin: the file must reach the furthest one's end
        end = int((self.pointers + self.sizes.to(torch.int64) * itemsize).max()) if n_items else 0
        size = os.path.getsize(bin_)
        if size < end:
            raise IndexedFileError(f"{bin_}: {size} bytes, the index needs {end}")
        self._data = torch.zeros(0, dtype=self._dtype)
        if size:
            with open(bin_, "rb") as f:  # copy-on-write map: writable for torch.frombuffer, never copied
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._data = torch.frombuffer(self._mmap, dtype=self._dtype, count=size // itemsize)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def __len__(self) -> int:
        return int(self.sizes.numel())

    def _item(self, i: int) -> torch.Tensor:
        start = int(self.pointers[i]) // self._dtype.itemsize
        return self._data[start : start + int(self.sizes[i])]

    def __getitem__(self, idx: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(idx, slice):
            return [self._item(i) for i in range(*idx.indices(len(self)))]
        n = len(self)
        i = int(idx) + n if int(idx) < 0 else int(idx)
        if not 0 <= i < n:
            raise IndexError(f"{self.path}: item {idx} of {n}")
        return self._item(i)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(every item's elements concatenated as int64 [sum(sizes)], item offsets int64 [len + 1]).

        Items written by a builder are contiguous in order, so this is one view of the data (plus the
        int64 conversion); a file whose items are out of order is gathered item by item."""
        sizes = self.sizes.to(torch.int64)
        offsets = torch.zeros(len(self) + 1, dtype=torch.int64)
        torch.cumsum(sizes, 0, out=offsets[1:])
        itemsize = self._dtype.itemsize
        if len(self) == 0:
            return torch.zeros(0, dtype=torch.int64), offsets
        if torch.equal(self.pointers, offsets[:-1] * itemsize):
            values = self._data[: int(offsets[-1])]
        else:
            values = torch.cat([self._item(i) for i in range(len(self))])
        return values.to(torch.int64), offsets

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return os.path.isfile(index_file_path(path)) and os.path.isfile(data_file_path(path))


class MMapIndexedDatasetBuilder:
    """Writes ``out_file`` (the .bin) item by item; ``finalize(index_file)`` writes the .idx."""

    def __init__(self, out_file: str | os.PathLike, dtype: Any = torch.int64) -> None:
        self._dtype = _as_dtype(dtype)
        self._file = open(out_file, "wb")  # noqa: SIM115 - closed by finalize
        self._sizes: list[int] = []
        self._doc_idx = [0]

    def add_item(self, values: Any) -> None:
        """Append one item: a tensor, array or sequence of integers (flattened, cast to the dtype)."""
        tensor = torch.as_tensor(values).reshape(-1)
        if tensor.is_floating_point() or tensor.is_complex():
            raise ValueError(f"indexed files hold integers; got a {tensor.dtype} item")
        tensor = tensor.to(torch.int64).to(self._dtype).contiguous()
        self._file.write(_raw_bytes(tensor))
        self._sizes.append(int(tensor.numel()))

    def add_items(self, items: Sequence[Any]) -> None:
        for item in items:
            self.add_item(item)

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def finalize(self, index_file: str | os.PathLike) -> None:
        self._file.close()
        sizes = torch.tensor(self._sizes, dtype=torch.int64)
        pointers = torch.zeros_like(sizes)
        if len(sizes) > 1:
            torch.cumsum(sizes[:-1] * self._dtype.itemsize, 0, out=pointers[1:])
        with open(index_file, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, CODES[self._dtype], len(sizes), len(self._doc_idx)))
            f.write(_raw_bytes(sizes.to(torch.int32)))
            f.write(_raw_bytes(pointers))
            f.write(_raw_bytes(torch.tensor(self._doc_idx, dtype=torch.int64)))


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """A CPU tensor's memory as bytes (no numpy: zerostep does not depend on it)."""
    t = tensor.contiguous()
    return bytes(t.untyped_storage())[t.storage_offset() * t.itemsize :][: t.nbytes] if t.numel() else b""


def create_mmap_dataset_builder(prefix: str | os.PathLike, dtype: Any) -> MMapIndexedDatasetBuilder:
    return MMapIndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)


def close_mmap_dataset_builder(builder: MMapIndexedDatasetBuilder, prefix: str | os.PathLike) -> None:
    """End the (single) document and write the index, as DeepSpeed's helper of the same name."""
    builder.end_document()
    builder.finalize(index_file_path(prefix))


def write_items(prefix: str | os.PathLike, items: Sequence[Any], dtype: Any) -> None:
    """Write ``items`` (1-D integer arrays) as ``<prefix>.bin``/``.idx`` in one document."""
    builder = create_mmap_dataset_builder(prefix, dtype)
    builder.add_items(items)
    close_mmap_dataset_builder(builder, prefix)


def write_flat(prefix: str | os.PathLike, values: torch.Tensor, sizes: torch.Tensor, dtype: Any) -> None:
    """Write items given as one flat tensor and their sizes (``sum(sizes) == len(values)``), in one
    write: what a reduce over millions of one-element items needs instead of an ``add_item`` each."""
    sizes = sizes.to(torch.int64)
    if int(sizes.sum()) != values.numel():
        raise ValueError(f"write_flat: sizes sum to {int(sizes.sum())}, values hold {values.numel()}")
    builder = create_mmap_dataset_builder(prefix, dtype)
    builder._file.write(_raw_bytes(values.reshape(-1).to(torch.int64).to(builder._dtype)))
    builder._sizes.extend(sizes.tolist())
    close_mmap_dataset_builder(builder, prefix)
