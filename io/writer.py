"""Streaming writer of pytree files (format in ``zerostep.io.codec``), atomic and checksummed.

Structure bytes come from ``msgpack.Packer`` and collect in a small buffer; tensor payloads go from the
tensor's own memory to ``os.write`` (no ``bytes`` copy, unlike ``msgpack.ExtType``), while worker threads
crc32 the same memory block by block (``zlib.crc32``-compatible, via ISA-L or libdeflate where
installed; they and ``os.write`` release the GIL). The payload's extent is ``fallocate``d first
(``zerostep.io.native``). The file is written under a temporary name in the destination folder and
renamed into place with ``os.replace``.
"""

from __future__ import annotations

import ctypes
import os
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from zerostep.io.codec import (
    BLOCK_BYTES,
    FORMAT,
    MAX_CHUNK_BYTES,
    PREAMBLE,
    VERSION,
    TensorRecord,
    TensorRef,
    dtype_name,
    frame_tensor,
    pack_index,
    pack_trailer,
    tuple_marker,
)
from zerostep.io.errors import CheckpointError
from zerostep.io.native import crc32, preallocate

# Bytes per os.write. A 1 GiB save into the page cache (this VM, 9-11 interleaved rounds) took
# 0.14-0.20 s in every round with 2 MiB calls, but 0.3-0.8 s in most rounds with a whole 32 MiB payload
# per call, and with 2 MiB calls ending on 2 MiB file offsets: both let the page cache take 2 MiB
# folios, which come from free blocks this VM has handed back to its host (each costs host faults, as
# huge pages do; see docs/ARCHITECTURE.md). 256 KiB calls took 0.20 s.
_WRITE_SLICE = 2 << 20
_FLUSH_AT = 1 << 20

_pool: ThreadPoolExecutor | None = None
WORKERS = max(2, min(8, os.cpu_count() or 2))  # threads of ``worker_pool``


def worker_pool() -> ThreadPoolExecutor:
    """Threads for checksums and copies, shared by the writer and the reader."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="zs-io")
    return _pool


def write_all(fd: int, data: memoryview | bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (tests replace this to simulate a full disk)."""
    view = memoryview(data)
    while len(view):
        n = os.write(fd, view[:_WRITE_SLICE])
        view = view[n:]


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable memoryview of its memory (no copy)."""
    if t.numel() == 0:  # an empty tensor may keep any strides, which view(uint8) refuses
        return memoryview(bytearray())
    flat = t.reshape(-1).view(torch.uint8)
    return memoryview((ctypes.c_ubyte * flat.numel()).from_address(flat.data_ptr())).cast("B")


def host_bytes(t: torch.Tensor) -> tuple[memoryview, torch.Tensor]:
    """A byte view of ``t``'s elements in row-major order, and the CPU tensor that owns them.

    Copies only when it must: a tensor on another device, non-contiguous, or with a lazy conj/neg bit.
    Keep the returned tensor alive as long as the view is in use.
    """
    t = t.detach()
    if t.layout != torch.strided:
        raise TypeError(f"cannot store a {t.layout} tensor; convert it to dense first")
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.resolve_conj().resolve_neg().contiguous()
    return byte_view(t), t


def block_crcs(view: memoryview, block_bytes: int) -> list[Future]:
    pool = worker_pool()
    return [pool.submit(crc32, view[i : i + block_bytes]) for i in range(0, len(view), block_bytes)]


@dataclass(frozen=True)
class WrittenFile:
    """What a reader of the manifest needs to know about a file just written."""

    path: str
    nbytes: int
    checksum: int  # crc32 of the index, which holds every other checksum of the file
    records: tuple[TensorRecord, ...]
    paths: dict[str, int]  # '/'-joined leaf path -> tensor index


class _Sink:
    """Sequential writes to ``fd`` with a running position and a crc of all non-payload bytes."""

    def __init__(self, fd: int):
        self.fd, self.pos, self.frame_crc, self.buf = fd, 0, 0, bytearray()

    def frame(self, data: bytes) -> None:
        self.buf += data
        self.frame_crc = zlib.crc32(data, self.frame_crc)
        self.pos += len(data)
        if len(self.buf) >= _FLUSH_AT:
            self.flush()

    def payload(self, view: memoryview) -> None:
        self.flush()
        write_all(self.fd, view)
        self.pos += len(view)

    def flush(self) -> None:
        if self.buf:
            write_all(self.fd, self.buf)
            self.buf.clear()


class _BodyWriter:
    """Walks a pytree once, writing the body and building the index skeleton and tensor records."""

    def __init__(self, sink: _Sink, block_bytes: int, max_chunk_bytes: int):
        self.sink, self.block_bytes, self.max_chunk_bytes = sink, block_bytes, max_chunk_bytes
        self.packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogatepass")
        self.records: list[TensorRecord] = []
        self.paths: dict[str, int] = {}

    def write(self, obj: Any, path: str) -> Any:
        pack, frame = self.packer, self.sink.frame
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if obj is None or isinstance(obj, bool):
            frame(pack.pack(obj))
            return obj
        if isinstance(obj, (int, float, str, bytes)):
            # Subclasses (IntEnum, numpy.float64, ...) are stored as, and load back as, the base type.
            base = next(b for b in (int, float, str, bytes) if isinstance(obj, b))
            value = obj if type(obj) is base else base(obj)
            try:
                frame(pack.pack(value))
            except OverflowError:
                raise ValueError(f"{path or '<root>'}: integer {obj} does not fit in 64 bits") from None
            return value
        if isinstance(obj, dict):
            frame(pack.pack_map_header(len(obj)))
            out = {}
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise TypeError(f"{path or '<root>'}: dict keys must be str, got {key!r}")
                frame(pack.pack(str(key)))
                out[str(key)] = self.write(value, f"{path}/{key}" if path else key)
            return out
        if isinstance(obj, (list, tuple)):
            if isinstance(obj, tuple):
                frame(pack.pack_array_header(2) + tuple_marker())
            frame(pack.pack_array_header(len(obj)))
            items = [self.write(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(obj)]
            return tuple(items) if isinstance(obj, tuple) else items
        raise TypeError(
            f"{path or '<root>'}: cannot store a {type(obj).__name__} "
            "(supported: dict, list, tuple, None, bool, int, float, str, bytes, torch.Tensor)"
        )

    def _tensor(self, t: torch.Tensor, path: str) -> TensorRef:
        name = dtype_name(t.dtype)
        view, owner = host_bytes(t)
        crcs = block_crcs(view, self.block_bytes)  # run while the payload is written
        extents = []
        for prefix, start, length in frame_tensor(
            self.sink.pos, name, tuple(t.shape), len(view), self.max_chunk_bytes
        ):
            self.sink.frame(prefix)
            extents.append((self.sink.pos, length))
            self.sink.payload(view[start : start + length])
        record = TensorRecord(
            t.dtype,
            tuple(t.shape),
            len(view),
            self.block_bytes,
            tuple(extents),
            tuple(f.result() for f in crcs),
        )
        del owner
        self.records.append(record)
        self.paths[path] = len(self.records) - 1
        return TensorRef(len(self.records) - 1)


def _payload_bytes(tree: Any) -> int:
    """Raw tensor bytes in ``tree`` (a lower bound of the file's size)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_payload_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_payload_bytes(v) for v in tree)
    return 0


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pytree(
    path: str | os.PathLike,
    tree: Any,
    *,
    meta: dict | None = None,
    fsync: bool = True,
    block_bytes: int = BLOCK_BYTES,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> WrittenFile:
    """Write ``tree`` to ``path`` atomically; ``meta`` (msgpack-able) is stored in the index.

    Raises ``TypeError``/``ValueError`` for a tree it cannot store and ``CheckpointError`` when the
    operating system refuses the write (the destination is then untouched and no temporary file is left).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise CheckpointError(path, f"cannot create file: {e}") from e
    try:
        try:
            preallocate(fd, _payload_bytes(tree))  # the file ends up larger: every byte is written
            sink = _Sink(fd)
            sink.frame(PREAMBLE)
            body = _BodyWriter(sink, block_bytes, max_chunk_bytes)
            skeleton = body.write(tree, "")
            index = pack_index(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "tree": skeleton,
                    "tensors": [r.to_msgpack() for r in body.records],
                    "frame_crc": sink.frame_crc,
                    "meta": meta if meta is not None else {},
                }
            )
            index_offset = sink.pos
            sink.flush()
            checksum = zlib.crc32(index)
            write_all(fd, index + pack_trailer(index_offset, len(index), checksum))
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(directory)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(path, f"write failed: {e}") from e
        raise
    nbytes = index_offset + len(index) + len(pack_trailer(0, 0, 0))
    return WrittenFile(path, nbytes, checksum, tuple(body.records), dict(body.paths))


def save_pytree(path: str | os.PathLike, tree: Any, *, fsync: bool = True, meta: dict | None = None) -> None:
    """Save a pytree of dict (str keys) / list / tuple / None / scalars / tensors to one file, atomically."""
    write_pytree(path, tree, meta=meta, fsync=fsync)
