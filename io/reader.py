"""Reader of pytree files: mmap, validate trailer and index, then read tensors or element ranges.

Nothing in the body is parsed: the index gives every tensor's byte extents, so a tensor (or a sub-range
of a large flat one, for resharding) is read by copying from the mmap into a tensor, or returned as a
zero-copy ``torch.frombuffer`` view of the mapping. A file that shrinks while open (another program
truncating it in place; zerostep's writer never does) is caught before each batch of reads; one
truncated in the middle of a copy would be a SIGBUS, as with safetensors or ``torch.load(mmap=True)``.
Checksums are verified per ``block_bytes`` block, so a partial read checks only the blocks it touches.
Every inconsistency raises ``CheckpointError``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import zlib
from concurrent.futures import wait
from typing import Any

import torch

from zerostep.io.codec import (
    FORMAT,
    PREAMBLE,
    TRAILER_LEN,
    VERSION,
    TensorRecord,
    TensorRef,
    unpack_index,
    unpack_trailer,
)
from zerostep.io.errors import CheckpointError
from zerostep.io.native import crc32
from zerostep.io.writer import byte_view, worker_pool

_INLINE_CRC_BYTES = 1 << 20  # below this, checksum in the calling thread


def _crc(parts: list[memoryview]) -> int:
    crc = 0
    for part in parts:
        crc = crc32(part, crc)
    return crc


def leaf_paths(skeleton: Any, prefix: str = "") -> dict[str, int]:
    """'/'-joined path of every tensor in an index skeleton -> its tensor index."""
    out: dict[str, int] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, TensorRef):
            out[path] = node.index
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}" if path else k)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}" if path else str(i))

    walk(skeleton, prefix)
    return out


class PytreeReader:
    """An open pytree file. Use as a context manager; tensors returned with ``copy=False`` keep the
    mapping alive after ``close``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mapped_out, self._fd = False, -1
        try:
            with open(self.path, "rb") as f:
                self.nbytes = os.fstat(f.fileno()).st_size
                head = f.read(len(PREAMBLE))
                if head != PREAMBLE[: len(head)] or (len(head) == len(PREAMBLE) and head != PREAMBLE):
                    self._fail("not a zerostep pytree file (wrong magic bytes at the start)")
                if self.nbytes < len(PREAMBLE) + TRAILER_LEN:
                    self._fail(f"truncated: only {self.nbytes} bytes")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                self._fd = os.dup(f.fileno())
                # a buffer export: the mapping cannot be closed under a copy in flight
                self._map_export = ctypes.c_char.from_buffer(self._mm)
                self._map_address = ctypes.addressof(self._map_export)
        except FileNotFoundError:
            raise CheckpointError(self.path, "file not found") from None
        except OSError as e:
            raise CheckpointError(self.path, f"cannot read: {e}") from e
        self._read_index()

    def _fail(self, reason: str) -> None:
        raise CheckpointError(self.path, reason)

    def _read_index(self) -> None:
        trailer = unpack_trailer(bytes(self._mm[self.nbytes - TRAILER_LEN :]))
        if trailer is None:
            self._fail("truncated or damaged: no valid trailer at the end of the file")
        index_offset, index_nbytes, index_crc, version = trailer
        if version != VERSION:
            self._fail(f"unsupported format version {version} (this zerostep reads version {VERSION})")
        if index_offset + index_nbytes + TRAILER_LEN != self.nbytes or index_offset < len(PREAMBLE):
            self._fail(
                f"truncated or damaged: the trailer describes a file of "
                f"{index_offset + index_nbytes + TRAILER_LEN} bytes, the file has {self.nbytes}"
            )
        raw = self._mm[index_offset : index_offset + index_nbytes]
        if zlib.crc32(raw) != index_crc:
            self._fail("checksum mismatch in the index (damaged file)")
        try:
            index = unpack_index(raw)
            if index.get("format") != FORMAT or index.get("version") != VERSION:
                self._fail(f"unknown format {index.get('format')!r} version {index.get('version')!r}")
            self.records = [TensorRecord.from_msgpack(r) for r in index["tensors"]]
            self.skeleton, self.meta, self._frame_crc = index["tree"], index["meta"], index["frame_crc"]
        except CheckpointError:
            raise
        except Exception as e:
            self._fail(f"index unreadable: {type(e).__name__}: {e}")
        self.checksum, self.index_offset = index_crc, index_offset
        self.paths = leaf_paths(self.skeleton)
        for i, rec in enumerate(self.records):
            self._check_record(i, rec)

    def _check_record(self, i: int, rec: TensorRecord) -> None:
        # The index checksum already passed; these checks keep a corrupt-but-consistent index from
        # ever reading outside the body.
        expected = rec.numel * rec.dtype.itemsize
        in_body = all(len(PREAMBLE) <= o and o + n <= self.index_offset for o, n in rec.extents)
        blocks = -(-rec.nbytes // rec.block_bytes) if rec.block_bytes > 0 else -1
        if (
            rec.nbytes != expected
            or sum(n for _, n in rec.extents) != rec.nbytes
            or not in_body
            or len(rec.crcs) != blocks
        ):
            self._fail(f"index entry of tensor {i} is inconsistent")

    # ---- reading and checksums ----

    def _pieces(self, rec: TensorRecord, start: int, stop: int) -> list[tuple[int, int]]:
        """File (offset, length) pieces holding raw bytes [start, stop) of ``rec``."""
        out, logical = [], 0
        for off, n in rec.extents:
            a, b = max(start, logical), min(stop, logical + n)
            if a < b:
                out.append((off + a - logical, b - a))
            logical += n
        return out

    def _copy(self, rec: TensorRecord, start: int, stop: int, dest: memoryview) -> None:
        """Copy raw bytes [start, stop) of ``rec`` into ``dest`` from the mapping. The page cache backs
        the mapping with large folios, so the source costs few faults; at 1 GiB this took a load from
        0.27 s (``preadv`` into the same memory) to 0.23 s, what safetensors plus ``clone`` takes.
        ``memmove`` through ctypes releases the GIL, so the worker threads copy in parallel. The caller
        has checked the file's size (``_check_size``)."""
        with memoryview(dest).cast("B") as out:
            at, to = 0, ctypes.addressof(ctypes.c_char.from_buffer(out)) if out.nbytes else 0
            for off, n in self._pieces(rec, start, stop):
                ctypes.memmove(to + at, self._map_address + off, n)
                at += n

    def _check_size(self) -> None:
        """Before touching the mapping: reading past a shrunk file's end would be a SIGBUS."""
        if os.fstat(self._fd).st_size != self.nbytes:
            self._fail("the file changed size while open (was it overwritten?)")

    def _read(self, rec: TensorRecord, start: int, stop: int, dest: memoryview | None, verify: bool) -> None:
        """Read raw bytes [start, stop) of ``rec`` into ``dest`` (if given) and check the crc32 of every
        block they touch."""
        self._read_many([(rec, start, stop, dest)], verify)

    def _read_many(self, reads: list[tuple[TensorRecord, int, int, memoryview | None]], verify: bool) -> None:
        """``_read`` of each ``(rec, start, stop, dest)``. The blocks of all of them are read and
        checksummed by the worker threads in parallel, each block checksummed right after it is copied
        (still in cache); page faults on fresh ``dest`` memory, the largest cost of a load into new
        memory, then also run in parallel. One wait for the whole list: waiting tensor by tensor left a
        thread idle at the end of each (a 1 GiB load of 32 tensors took 0.23 s instead of 0.21 s)."""
        self._check_size()
        jobs = []  # (rec, block, result or future)
        inline = sum(stop - start for _, start, stop, _ in reads) <= _INLINE_CRC_BYTES
        pool = None if inline else worker_pool()
        try:
            for rec, start, stop, dest in reads:
                if stop <= start or (dest is None and not verify):
                    continue
                size = rec.block_bytes
                for k in range(start // size, (stop - 1) // size + 1):
                    args = (rec, k, start, stop, dest, verify)
                    jobs.append((rec, k, self._block(*args) if inline else pool.submit(self._block, *args)))
        finally:
            wait([job for _, _, job in jobs if not isinstance(job, bool)])  # all done with ``dest``
        for rec, k, job in jobs:
            if not (job if isinstance(job, bool) else job.result()):
                name = next((p for p, i in self.paths.items() if self.records[i] is rec), "?")
                self._fail(f"checksum mismatch in tensor {name!r} (block {k} of {len(rec.crcs)})")

    def _block(
        self, rec: TensorRecord, k: int, start: int, stop: int, dest: memoryview | None, verify: bool
    ) -> bool:
        """Read the part of checksum block ``k`` inside [start, stop) into ``dest`` (if given); False if
        ``verify`` and the block's crc32 differs from the index."""
        k_start, k_stop = k * rec.block_bytes, min((k + 1) * rec.block_bytes, rec.nbytes)
        a, b = max(start, k_start), min(stop, k_stop)
        if dest is not None:
            self._copy(rec, a, b, dest[a - start : b - start])
        if not verify:
            return True
        if dest is None:  # checksum the mapping itself
            with memoryview(self._mm) as mm:
                return _crc([mm[o : o + n] for o, n in self._pieces(rec, k_start, k_stop)]) == rec.crcs[k]
        # the block's bytes outside [start, stop) are read into scratch memory
        parts = [dest[a - start : b - start]]
        if k_start < a:
            parts.insert(0, self._scratch(rec, k_start, a))
        if b < k_stop:
            parts.append(self._scratch(rec, b, k_stop))
        return _crc(parts) == rec.crcs[k]

    def _scratch(self, rec: TensorRecord, start: int, stop: int) -> memoryview:
        buf = memoryview(bytearray(stop - start))
        self._copy(rec, start, stop, buf)
        return buf

    def verify_frame(self) -> None:
        """Check every byte of the body outside tensor payloads (structure, ext headers, padding)."""
        self._check_size()
        crc, pos = 0, 0
        with memoryview(self._mm) as view:
            for off, n in sorted(e for rec in self.records for e in rec.extents):
                crc = zlib.crc32(view[pos:off], crc)
                pos = off + n
            crc = zlib.crc32(view[pos : self.index_offset], crc)
        if crc != self._frame_crc:
            self._fail("checksum mismatch in the tree structure (damaged file)")

    def verify(self) -> None:
        """Check every checksum of the file without building tensors."""
        self.verify_frame()
        for rec in self.records:
            self._read(rec, 0, rec.nbytes, None, True)

    # ---- tensors ----

    def _record(self, key: int | str) -> TensorRecord:
        if isinstance(key, str):
            if key not in self.paths:
                self._fail(f"no tensor at path {key!r}")
            key = self.paths[key]
        return self.records[key]

    def tensor(
        self, key: int | str, *, verify: bool = True, copy: bool = True, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tensor ``key`` (index or leaf path): a new tensor, ``out`` filled, or (``copy=False``, one
        extent) a view of the mapping, private copy-on-write."""
        rec = self._record(key)
        if out is None and not copy and len(rec.extents) == 1 and rec.nbytes:
            off, n = rec.extents[0]
            self._read(rec, 0, rec.nbytes, None, verify)
            self._mapped_out = True  # the tensor points into the mapping: never unmap it explicitly
            result = torch.frombuffer(self._mm, dtype=torch.uint8, count=n, offset=off)
            return result.view(rec.dtype).view(rec.shape)
        else:
            result = torch.empty(rec.shape, dtype=rec.dtype) if out is None else out
            if out is not None and (
                out.dtype != rec.dtype
                or out.numel() != rec.numel
                or not out.is_contiguous()
                or out.device.type != "cpu"
            ):
                raise ValueError(f"out must be a contiguous CPU {rec.dtype} tensor of {rec.numel} elements")
            if rec.nbytes:
                self._read(rec, 0, rec.nbytes, byte_view(result), verify)
        return result

    def read_elements(
        self, key: int | str, start: int, stop: int, *, out: torch.Tensor | None = None, verify: bool = True
    ) -> torch.Tensor:
        """Elements [start, stop) of the row-major flattening of tensor ``key``, reading only those bytes
        (and the checksum blocks around them). Fills ``out`` ([stop - start], contiguous) if given."""
        rec = self._record(key)
        if not 0 <= start <= stop <= rec.numel:
            raise ValueError(f"element range [{start}, {stop}) outside tensor of {rec.numel} elements")
        size = rec.dtype.itemsize
        if out is None:
            out = torch.empty(stop - start, dtype=rec.dtype)
        elif out.dtype != rec.dtype or out.numel() != stop - start or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {rec.dtype} tensor of {stop - start} elements")
        self._read(rec, start * size, stop * size, byte_view(out), verify)
        return out

    def load(self, *, verify: bool = True, copy: bool = True, out: Any = None) -> Any:
        """The whole tree, tensors materialized (``copy=True``) or mapped. ``out``: a tree holding a
        tensor of the same shape and dtype at every tensor's path (as ``load_pytree`` documents), filled in
        place and returned inside the loaded tree."""
        if verify:
            self.verify_frame()
        materialize = copy or out is not None
        if out is not None:
            targets = self._targets(out)
            # GPU or strided targets are read into host memory first, then copied
            tensors = [
                t if t.device.type == "cpu" and t.is_contiguous() else torch.empty(t.shape, dtype=t.dtype)
                for t in targets
            ]
            if verify:  # check the mapping before writing a byte into the caller's memory
                self._read_many([(rec, 0, rec.nbytes, None) for rec in self.records], True)
        elif copy:  # allocate every tensor, then read them all in one parallel pass
            tensors = [torch.empty(rec.shape, dtype=rec.dtype) for rec in self.records]
        if materialize:
            self._read_many(
                [(rec, 0, rec.nbytes, byte_view(t)) for rec, t in zip(self.records, tensors) if rec.nbytes],
                verify and out is None,
            )
        if out is not None:
            tensors = [t if t is h else t.copy_(h) for t, h in zip(targets, tensors)]

        def build(node: Any) -> Any:
            if isinstance(node, TensorRef):
                if materialize:
                    return tensors[node.index]
                return self.tensor(node.index, verify=verify, copy=False)
            if isinstance(node, dict):
                return {k: build(v) for k, v in node.items()}
            if isinstance(node, list):
                return [build(v) for v in node]
            if isinstance(node, tuple):
                return tuple(build(v) for v in node)
            return node

        return build(self.skeleton)

    def _targets(self, out: Any) -> list[torch.Tensor]:
        """The tensor of ``out`` at each record's place in the tree, or ``CheckpointError`` listing every
        mismatch. Matched by structure, so keys holding '/' cannot collide."""
        targets: list[Any] = [None] * len(self.records)
        problems: list[str] = []

        def extra(given: Any, path: str) -> None:  # tensors in ``out`` where the file has none
            if isinstance(given, torch.Tensor):
                problems.append(f"{path or '<root>'}: a tensor in out, not in the file")
            elif isinstance(given, dict):
                for k, v in given.items():
                    extra(v, f"{path}/{k}" if path else str(k))
            elif isinstance(given, (list, tuple)):
                for i, v in enumerate(given):
                    extra(v, f"{path}/{i}" if path else str(i))

        def walk(node: Any, given: Any, path: str) -> None:
            name = path or "<root>"
            if isinstance(node, TensorRef):
                rec = self.records[node.index]
                if not isinstance(given, torch.Tensor):
                    problems.append(f"{name}: a tensor in the file, {type(given).__name__} in out")
                elif tuple(given.shape) != rec.shape or given.dtype != rec.dtype:
                    have, want = f"{rec.dtype} {list(rec.shape)}", f"{given.dtype} {list(given.shape)}"
                    problems.append(f"{name}: file has {have}, out has {want}")
                else:
                    targets[node.index] = given
            elif isinstance(node, dict):
                if not isinstance(given, dict):
                    given = {}
                for k, v in node.items():
                    walk(v, given.get(k), f"{path}/{k}" if path else k)
                for k, v in given.items():
                    if k not in node:
                        extra(v, f"{path}/{k}" if path else str(k))
            elif isinstance(node, (list, tuple)):
                if not isinstance(given, (list, tuple)):
                    given = ()
                for i, v in enumerate(node):
                    walk(v, given[i] if i < len(given) else None, f"{path}/{i}" if path else str(i))
                for i in range(len(node), len(given)):
                    extra(given[i], f"{path}/{i}" if path else str(i))
            else:
                extra(given, path)

        walk(self.skeleton, out, "")
        if problems:
            shown = "; ".join(problems[:20])
            more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
            self._fail(f"out does not match the file's tensors: {shown}{more}")
        used = [t.data_ptr() for t in targets if t.numel()]
        if len(set(used)) < len(used):
            self._fail("out holds the same memory at two places; each tensor needs its own")
        return targets

    def close(self) -> None:
        # torch.frombuffer keeps a reference to the mmap object but no buffer export, so closing would
        # unmap memory under zero-copy tensors; leave those mappings to the garbage collector.
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._map_export = None
        if not self._mapped_out:
            try:
                self._mm.close()
            except BufferError:
                pass  # a memoryview still held by a traceback; unmapped when it is collected

    def __enter__(self) -> PytreeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_pytree(path: str | os.PathLike, *, verify: bool = True, mmap: bool = False, out: Any = None) -> Any:
    """Load a file written by ``save_pytree``. ``verify`` checks every checksum (default);
    ``mmap=True`` returns tensors that view the file's mapping (private, copy-on-write) instead of
    copies.

    ``out`` loads in place, as ``load_state_dict`` does: a tree (dicts, lists, tuples; paths are keys
    and indices joined by '/') with a tensor of the saved shape and dtype at every saved tensor's path,
    on any device. Those tensors are filled and come back inside the loaded tree; no new memory is
    allocated for CPU contiguous ones. Nothing is written into ``out`` unless the whole file checks out:
    a tree that does not match raises ``CheckpointError`` listing every difference, and with ``verify``
    every checksum is checked on the file's mapping before the copy (a second pass over cached pages, so
    an in-place load costs more than ``verify=False``)."""
    if mmap and out is not None:
        raise ValueError("load_pytree: mmap=True and out= are exclusive (out is filled by copying)")
    with PytreeReader(path) as reader:
        return reader.load(verify=verify, copy=not mmap, out=out)
