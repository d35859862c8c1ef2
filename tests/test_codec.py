"""The byte format: tensor framing, alignment, chunking, the index and trailer, plain-msgpack decoding."""

import msgpack
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zerostep.io import codec, write_pytree
from zerostep.io.codec import (
    ALIGN,
    DTYPES,
    TensorRef,
    decode_body,
    dtype_from_name,
    dtype_name,
    frame_tensor,
    pack_index,
    pack_trailer,
    unpack_index,
    unpack_trailer,
)


def test_dtype_table_covers_every_plain_dtype_of_this_torch():
    expected = {"float32", "float64", "float16", "bfloat16", "complex64", "complex128", "bool", "uint8"}
    expected |= {
        "int8",
        "int16",
        "int32",
        "int64",
        "uint16",
        "uint32",
        "uint64",
        "float8_e4m3fn",
        "float8_e5m2",
    }
    assert expected <= set(DTYPES)
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name and dtype_from_name(name) is dtype
    with pytest.raises(TypeError, match="cannot be stored"):
        dtype_name(torch.qint8)
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_from_name("float7")


@given(
    pos=st.integers(0, 10_000),
    shape=st.lists(st.integers(0, 5), max_size=4),
    nbytes=st.integers(0, 5000),
    max_chunk=st.integers(1, 3000),
)
def test_frames_put_every_payload_on_an_alignment_boundary(pos, shape, nbytes, max_chunk):
    pieces = frame_tensor(pos, "float32", tuple(shape), nbytes, max_chunk)
    at, covered = pos, 0
    for prefix, start, length in pieces:
        at += len(prefix)
        assert at % ALIGN == 0 and start == covered and 0 <= length <= max_chunk
        at += length
        covered += length
    assert covered == nbytes
    assert len(pieces) == (1 if nbytes <= max_chunk else -(-nbytes // max_chunk))


def test_a_tensor_frame_is_a_standard_msgpack_ext_value():
    t = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    ((prefix, _, _),) = frame_tensor(5, "int16", (2, 3), 12, codec.MAX_CHUNK_BYTES)
    ext = msgpack.unpackb(prefix + t.numpy().tobytes())
    assert isinstance(ext, msgpack.ExtType) and ext.code == codec.EXT_TENSOR
    unpacker = msgpack.Unpacker()
    unpacker.feed(ext.data)
    dtype, shape, pad = unpacker.unpack()
    assert (dtype, shape) == ("int16", [2, 3])
    raw = ext.data[unpacker.tell() + pad :]
    assert raw == t.numpy().tobytes()


def test_index_keeps_tuples_refs_and_surrogates():
    obj = {"tree": ({"a": TensorRef(3)}, [TensorRef(0), (1, 2.5, None)], "\ud800"), "n": b"\x00"}
    assert unpack_index(pack_index(obj)) == obj
    with pytest.raises(TypeError):
        pack_index({"x": object()})


def test_trailer_round_trip_and_rejection():
    trailer = pack_trailer(123, 456, 0xDEADBEEF)
    assert len(trailer) == codec.TRAILER_LEN and msgpack.unpackb(trailer)[-4:] == b"ZSTP"
    assert unpack_trailer(trailer) == (123, 456, 0xDEADBEEF, codec.VERSION)
    assert unpack_trailer(trailer[:-1] + b"X") is None
    assert unpack_trailer(b"\x00" * codec.TRAILER_LEN) is None


def test_whole_file_is_a_msgpack_stream_any_reader_can_decode(tmp_path):
    tree = {
        "w": torch.randn(3, 5),
        "big": torch.arange(700, dtype=torch.float64),  # chunked below
        "t": (1, "two", [torch.tensor(True)], ()),
        "none": None,
        "b": b"\x01\x02",
        "e": torch.empty(0, 2, dtype=torch.bfloat16),
    }
    path = tmp_path / "f.msgpack"
    write_pytree(path, tree, max_chunk_bytes=1000, block_bytes=512)
    data = path.read_bytes()
    out = decode_body(data)
    assert out.keys() == tree.keys()
    assert torch.equal(out["w"], tree["w"]) and torch.equal(out["big"], tree["big"])
    assert out["t"][:2] == (1, "two") and out["t"][3] == () and isinstance(out["t"], tuple)
    assert out["t"][2][0].item() is True and out["b"] == b"\x01\x02" and out["none"] is None
    assert out["e"].shape == (0, 2) and out["e"].dtype == torch.bfloat16
    # four objects: preamble, body, index, trailer
    unpacker = msgpack.Unpacker(raw=False, ext_hook=lambda c, d: c, max_buffer_size=len(data))
    unpacker.feed(data)
    objects = list(unpacker)
    assert len(objects) == 4 and objects[0] == b"zerostep.pytree\0" and objects[2]["format"] == codec.FORMAT


# ---- native helpers: the fast crc32 must equal zlib's, and preallocation must never change a file ----


def _crc_inputs():
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw = bytearray(data.numpy().tobytes())
    view = memoryview(raw)
    cases = [view[:0], view[:1], view[: (64 << 10) - 1], view[: 64 << 10], view[3 : (1 << 20) + 7], view]
    return raw, cases


def _use_crc32(native, impl: str, monkeypatch) -> None:
    """Make ``native.crc32`` use ``impl`` alone (skip where it is not installed)."""
    present = {"isal": native._isal_crc32, "libdeflate": native._libdeflate_crc32, "zlib": True}
    if present[impl] is None:
        pytest.skip(f"{impl} is not installed here")
    if impl != "isal":
        monkeypatch.setattr(native, "_isal_crc32", None)
    if impl == "zlib":
        monkeypatch.setattr(native, "_libdeflate_crc32", None)


@pytest.mark.parametrize("impl", ["isal", "libdeflate", "zlib"])
def test_crc32_equals_zlib_on_every_size_offset_and_chain(impl, monkeypatch):
    import mmap
    import zlib

    from zerostep.io import native

    _use_crc32(native, impl, monkeypatch)
    raw, cases = _crc_inputs()
    for part in cases:
        for start in (0, 0xDEADBEEF):
            assert native.crc32(part, start) == zlib.crc32(part, start), (len(part), start)
    # chaining over pieces equals one pass over the whole; bytes (read-only) and mmap buffers work too
    chained = 0
    for i in range(0, len(raw), 700_001):
        chained = native.crc32(memoryview(raw)[i : i + 700_001], chained)
    assert chained == zlib.crc32(raw) == native.crc32(bytes(raw)) == native.crc32(raw)
    with mmap.mmap(-1, len(raw)) as mm:
        mm[:] = raw
        assert native.crc32(mm) == zlib.crc32(raw)
    # a tensor's own memory, as the writer hands it over
    from zerostep.io.writer import byte_view

    t = torch.frombuffer(raw, dtype=torch.float32).clone()
    assert native.crc32(byte_view(t)) == zlib.crc32(raw)


def test_files_are_identical_with_and_without_the_fast_crc(tmp_path, monkeypatch):
    from zerostep.io import native

    tree = {"a": torch.randn(300_000), "b": [torch.arange(70_000, dtype=torch.int64), 3]}
    fast = write_pytree(tmp_path / "fast.msgpack", tree, fsync=False, block_bytes=1 << 20)
    _use_crc32(native, "zlib", monkeypatch)
    slow = write_pytree(tmp_path / "slow.msgpack", tree, fsync=False, block_bytes=1 << 20)
    assert (tmp_path / "fast.msgpack").read_bytes() == (tmp_path / "slow.msgpack").read_bytes()
    assert fast.records == slow.records


def test_preallocate_grows_the_file_reports_unsupported_and_raises_when_full(tmp_path, monkeypatch):
    import ctypes
    import errno
    import os

    from zerostep.io import native

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if native.preallocate(fd, 12345):
            assert os.fstat(fd).st_size == 12345
        assert native.preallocate(fd, 0) is False

        def failing(code):
            def fallocate(fd, mode, offset, length):
                ctypes.set_errno(code)
                return -1

            return fallocate

        monkeypatch.setattr(native, "_fallocate", failing(errno.EOPNOTSUPP))
        assert native.preallocate(fd, 1 << 20) is False  # the filesystem cannot: writes proceed as usual
        monkeypatch.setattr(native, "_fallocate", failing(errno.ENOSPC))
        with pytest.raises(OSError, match="No space left"):
            native.preallocate(fd, 1 << 20)
    finally:
        os.close(fd)
