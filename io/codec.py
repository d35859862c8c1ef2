"""The zerostep pytree file format: msgpack with a tensor ext type whose payload is aligned raw bytes.

A file is a sequence of four msgpack objects, so any msgpack reader can walk it::

    preamble  bin8  b"zerostep.pytree\\0"                    (18 bytes, at offset 0)
    body      the tree: map (str keys) / array / nil / bool / int / float / str / bin,
              tensors as ext values (below), a tuple as array(2) [ext TUPLE (empty), array(items)]
    index     map: {"format", "version", "tree": skeleton, "tensors": [record...], "frame_crc", "meta"}
    trailer   bin8 of 28 bytes: <u64 index_offset> <u64 index_nbytes> <u32 crc32(index)>
              <u32 version> b"ZSTP"                            (30 bytes, at the end of the file)

A tensor of at most ``max_chunk_bytes`` raw bytes is one ext 32 value of type ``EXT_TENSOR``::

    c9 <u32 BE len> 01 | msgpack [dtype, [shape...], pad] | pad zero bytes | raw little-endian bytes

where ``pad`` (< ALIGN) puts the raw bytes at a multiple of ``ALIGN`` in the file, so a reader can
``mmap`` the file and hand ``torch.frombuffer`` aligned memory. A larger tensor (msgpack-python refuses
ext values over 2 GiB - 1 by default) is ``array(1 + n) [ext HEAD [dtype, shape, n], ext CHUNK ...]``
where each chunk is ``c9 <len> 04 | msgpack pad | pad zeros | raw bytes``.

Readers never parse the body: the index repeats the tree as a *skeleton* (tensors replaced by
``TensorRef(i)``) and records, per tensor, its dtype, shape, byte extents in the file and one crc32 per
``block_bytes`` of its raw bytes. ``frame_crc`` covers every body byte outside the raw extents and the
trailer's crc covers the index, so every byte of the file is checked. ``decode_body`` is the reference
decoder of the body alone (for interoperability and tests).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

FORMAT = "zerostep.pytree"
VERSION = 1
PREAMBLE = msgpack.packb(b"zerostep.pytree\0", use_bin_type=True)  # c4 10 + 16 bytes
ALIGN = 64
MAX_CHUNK_BYTES = 2**31 - 1  # msgpack-python's default cap for one ext/bin value
BLOCK_BYTES = 4 << 20  # checksum granularity: a partial read verifies at most two extra blocks

EXT_TENSOR = 1
EXT_TUPLE = 2
EXT_HEAD = 3
EXT_CHUNK = 4
EXT_REF = 5  # only in the index skeleton

TRAILER_MAGIC = b"ZSTP"
_TRAILER_BODY = struct.Struct("<QQII4s")  # index_offset, index_nbytes, index_crc, version, magic
TRAILER_LEN = 2 + _TRAILER_BODY.size

_EXT32 = struct.Struct(">cIb")  # 0xc9, u32 big-endian data length, i8 type code

if sys.byteorder != "little":  # raw bytes are written as in memory; the format says little-endian
    raise ImportError("zerostep.io supports little-endian hosts only")


# Every dtype whose elements are plain bytes; names are torch's attribute names, stable across releases.
_DTYPE_NAMES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "complex32",
    "complex64",
    "complex128",
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "uint32",
    "uint64",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
)
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)}
_NAMES: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored (supported: {', '.join(DTYPES)})") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (this torch knows {', '.join(DTYPES)})") from None


@dataclass(frozen=True)
class TensorRef:
    """Stands for tensor ``index`` of a file in the index skeleton."""

    index: int


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor's raw bytes live: ``extents`` are (file offset, nbytes) in order."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    block_bytes: int
    extents: tuple[tuple[int, int], ...]
    crcs: tuple[int, ...]  # crc32 of each block_bytes of the raw bytes (the last block may be short)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def to_msgpack(self) -> list:
        return [
            dtype_name(self.dtype),
            list(self.shape),
            self.nbytes,
            self.block_bytes,
            [list(e) for e in self.extents],
            list(self.crcs),
        ]

    @staticmethod
    def from_msgpack(obj: list) -> TensorRecord:
        dtype, shape, nbytes, block, extents, crcs = obj
        return TensorRecord(
            dtype_from_name(dtype),
            tuple(int(s) for s in shape),
            int(nbytes),
            int(block),
            tuple((int(o), int(n)) for o, n in extents),
            tuple(int(c) for c in crcs),
        )


def ext32_header(code: int, data_len: int) -> bytes:
    return _EXT32.pack(b"\xc9", data_len, code)


def frame_tensor(pos: int, dtype: str, shape: tuple[int, ...], nbytes: int, max_chunk_bytes: int):
    """Plan the bytes of one tensor value written at file offset ``pos``.

    Returns ``[(prefix, start, length)]``: write ``prefix``, then raw bytes ``[start, start + length)`` of
    the tensor, for each piece in order. Prefixes end exactly where an ALIGN boundary begins.
    """
    if nbytes <= max_chunk_bytes:
        meta_len = len(msgpack.packb([dtype, list(shape), 0]))  # pad < 64 is one fixint byte
        pad = -(pos + _EXT32.size + meta_len) % ALIGN
        meta = msgpack.packb([dtype, list(shape), pad])
        prefix = ext32_header(EXT_TENSOR, meta_len + pad + nbytes) + meta + bytes(pad)
        return [(prefix, 0, nbytes)]
    n_chunks = -(-nbytes // max_chunk_bytes)
    packer = msgpack.Packer(use_bin_type=True)
    head = packer.pack_array_header(1 + n_chunks)
    head += packer.pack_ext_type(EXT_HEAD, msgpack.packb([dtype, list(shape), n_chunks]))
    pieces, start = [], 0
    for _ in range(n_chunks):
        length = min(max_chunk_bytes, nbytes - start)
        at = pos + len(head) + _EXT32.size + 1
        pad = -at % ALIGN
        prefix = head + ext32_header(EXT_CHUNK, 1 + pad + length) + bytes([pad]) + bytes(pad)
        pieces.append((prefix, start, length))
        pos += len(prefix) + length
        start += length
        head = b""
    return pieces


def tuple_marker() -> bytes:
    return ext32_header(EXT_TUPLE, 0)


# ---- index (the skeleton keeps tuples as tuples and tensors as TensorRef) ----


def _index_default(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, tuple):
        return msgpack.ExtType(EXT_TUPLE, pack_index(list(obj)))
    if isinstance(obj, TensorRef):
        return msgpack.ExtType(EXT_REF, struct.pack("<Q", obj.index))
    raise TypeError(f"cannot store {type(obj).__name__} in an index")


def _index_ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_TUPLE:
        return tuple(unpack_index(data))
    if code == EXT_REF:
        return TensorRef(struct.unpack("<Q", data)[0])
    raise ValueError(f"unknown ext type {code} in index")


def pack_index(obj: Any) -> bytes:
    return msgpack.packb(
        obj, use_bin_type=True, strict_types=True, default=_index_default, unicode_errors="surrogatepass"
    )


def unpack_index(data: bytes) -> Any:
    return msgpack.unpackb(
        data, raw=False, ext_hook=_index_ext_hook, strict_map_key=True, unicode_errors="surrogatepass"
    )


def pack_trailer(index_offset: int, index_nbytes: int, index_crc: int) -> bytes:
    body = _TRAILER_BODY.pack(index_offset, index_nbytes, index_crc, VERSION, TRAILER_MAGIC)
    return b"\xc4" + bytes([_TRAILER_BODY.size]) + body


def unpack_trailer(data: bytes) -> tuple[int, int, int, int] | None:
    """(index_offset, index_nbytes, index_crc, version), or None if ``data`` is not a trailer."""
    if len(data) != TRAILER_LEN or data[:2] != b"\xc4" + bytes([_TRAILER_BODY.size]):
        return None
    offset, nbytes, crc, version, magic = _TRAILER_BODY.unpack(data[2:])
    if magic != TRAILER_MAGIC:
        return None
    return offset, nbytes, crc, version


# ---- reference decoder of the body (copies; for interoperability and tests, not for loading) ----


class _TupleMark:
    pass


@dataclass
class _Head:
    dtype: str
    shape: list
    n_chunks: int


def _tensor_from_bytes(dtype: str, shape: list, raw: bytes | bytearray) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype_from_name(dtype))
    if raw:
        out.reshape(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return out


def _body_ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_TUPLE:
        return _TupleMark()
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    meta = unpacker.unpack()
    rest = data[unpacker.tell() :]
    if code == EXT_TENSOR:
        dtype, shape, pad = meta
        return _tensor_from_bytes(dtype, shape, rest[pad:])
    if code == EXT_HEAD:
        return _Head(*meta)
    if code == EXT_CHUNK:
        return rest[meta:]
    return msgpack.ExtType(code, data)


def _body_list_hook(items: list) -> Any:
    if len(items) == 2 and isinstance(items[0], _TupleMark):
        return tuple(items[1])
    if items and isinstance(items[0], _Head):
        head = items[0]
        return _tensor_from_bytes(head.dtype, head.shape, b"".join(items[1:]))
    return items


def decode_body(data: bytes | memoryview) -> Any:
    """Decode a whole file's bytes with plain msgpack (no index): the tree, tensors copied."""
    unpacker = msgpack.Unpacker(
        raw=False,
        ext_hook=_body_ext_hook,
        list_hook=_body_list_hook,
        max_buffer_size=max(len(data), 1),
        unicode_errors="surrogatepass",
    )
    unpacker.feed(data)
    if unpacker.unpack() != PREAMBLE[2:]:
        raise ValueError("not a zerostep pytree file (preamble)")
    return unpacker.unpack()
