"""save_pytree / load_pytree / PytreeReader: exact round trips, partial reads, and every kind of damage."""

import errno
import os
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zerostep.io import CheckpointError, PytreeReader, load_pytree, save_pytree, write_pytree
from zerostep.io import writer as writer_mod
from zerostep.io.codec import DTYPES, TRAILER_LEN


def assert_same(a, b, path="root"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        empty = torch.empty(0, dtype=torch.uint8)
        # bools as bytes before any copy: copying a bool tensor turns bytes other than 0 and 1 into 1
        as_bytes = lambda t: (t.view(torch.uint8) if t.dtype == torch.bool else t).detach()
        raw = lambda t: as_bytes(t).contiguous().reshape(-1).view(torch.uint8) if t.numel() else empty
        assert torch.equal(raw(a.resolve_conj().resolve_neg()), raw(b)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), path  # NaN payloads and -0.0 too
    else:
        assert a == b, path


@st.composite
def tensors(draw):
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    n = 1
    for s in shape:
        n *= s
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if n else None
    t = torch.empty(shape, dtype=dtype) if t is None else t
    layout = draw(st.sampled_from(["plain", "transposed", "strided", "expanded", "conj"]))
    if layout == "transposed" and t.dim() >= 2:
        t = t.mT.contiguous().mT  # same values, column-major strides
    elif layout == "strided" and t.dim() >= 1:
        # every other element of a bigger buffer, built from bytes (cat is not implemented for every dtype)
        raw = t.reshape(-1).view(torch.uint8).reshape(n, dtype.itemsize)
        t = torch.stack([raw, raw], dim=1).reshape(-1).view(dtype).reshape(*shape, 2)[..., 0]
    elif layout == "expanded" and t.dim() >= 1 and t.shape[0] == 1:
        t = t[:1].expand(3, *t.shape[1:])  # stride 0
    elif layout == "conj" and dtype in (torch.complex64, torch.complex128):
        t = t.conj()  # lazy conjugate bit
    return t


scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=6)
trees = st.recursive(
    scalars | st.binary(max_size=6) | tensors(),
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=12,
)


def _blank_like(tree, column_major: bool):
    """``tree`` with every tensor replaced by a new one of its shape and dtype, every byte 1 (fill_ is
    not implemented for every dtype), column-major when asked, so a strided ``out`` gets exercised."""
    if isinstance(tree, torch.Tensor):
        strided = column_major and tree.dim() >= 2
        base = torch.empty(tree.mT.shape if strided else tree.shape, dtype=tree.dtype)
        base.reshape(-1).view(torch.uint8).fill_(1)
        return base.mT if strided else base
    if isinstance(tree, dict):
        return {k: _blank_like(v, column_major) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_blank_like(v, column_major) for v in tree)
    return tree


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


@given(tree=trees, mode=st.sampled_from(["copy", "mmap", "out", "strided out"]))
def test_round_trip_is_exact(tmp_path_factory, tree, mode):
    path = tmp_path_factory.mktemp("rt") / "tree.msgpack"
    save_pytree(path, tree, fsync=False)
    if mode.endswith("out"):
        out = _blank_like(tree, column_major=mode == "strided out")
        loaded = load_pytree(path, out=out)
        assert all(a is b for a, b in zip(_tensors(loaded), _tensors(out), strict=True))
    else:
        loaded = load_pytree(path, mmap=mode == "mmap")
    assert_same(tree, loaded)
    with PytreeReader(path) as reader:
        reader.verify()


def test_load_into_existing_tensors_allocates_nothing_and_lists_every_mismatch(tmp_path):
    path = tmp_path / "in.msgpack"
    saved = {"w": torch.arange(6.0).reshape(2, 3), "opt": [torch.ones(4, dtype=torch.int64), 7], "s": "x"}
    save_pytree(path, saved)
    out = {"w": torch.zeros(2, 3), "opt": [torch.zeros(4, dtype=torch.int64), 0]}
    address = out["w"].data_ptr()
    loaded = load_pytree(path, out=out)
    assert loaded["w"] is out["w"] and out["w"].data_ptr() == address
    assert_same(saved, loaded)  # scalars come from the file
    bad = {"w": torch.zeros(2, 3), "opt": [torch.zeros(4), 0], "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError) as err:
        load_pytree(path, out=bad)
    message = str(err.value)
    assert "in.msgpack" in message
    assert "opt/0: file has torch.int64 [4], out has torch.float32 [4]" in message
    assert "extra: a tensor in out, not in the file" in message
    assert torch.equal(bad["w"], torch.zeros(2, 3))  # w matched, yet nothing is written on a mismatch
    shape_message = r"w: file has torch.float32 \[2, 3\], out has torch.float32 \[3, 2\]"
    with pytest.raises(CheckpointError, match=shape_message):
        load_pytree(path, out={**out, "w": torch.zeros(3, 2)})
    with pytest.raises(CheckpointError, match="opt/0: a tensor in the file, missing in out"):
        load_pytree(path, out={"w": torch.zeros(2, 3)})
    kind_message = "opt: a list in the file, a dict in out; opt/m: a tensor in out"
    with pytest.raises(CheckpointError, match=kind_message):
        load_pytree(path, out={"w": torch.zeros(2, 3), "opt": {"m": torch.zeros(4)}})
    with pytest.raises(CheckpointError, match="opt/0: a tensor in the file, None in out"):
        load_pytree(path, out={"w": torch.zeros(2, 3), "opt": [None]})
    with pytest.raises(ValueError, match="exclusive"):
        load_pytree(path, mmap=True, out=out)


def test_load_into_parameters_views_and_other_devices(tmp_path):
    path = tmp_path / "p.msgpack"
    saved = {
        "w": torch.arange(6.0).reshape(2, 3),
        "b": torch.arange(4.0),
        "mask": torch.tensor([2, 0, 1, 1], dtype=torch.uint8).view(torch.bool).reshape(2, 2),
        "z": torch.tensor([1 + 2j, 3 - 4j]),
    }
    save_pytree(path, saved)
    model = torch.nn.Linear(3, 2)
    weight_version = model.weight._version
    out = {
        "w": model.weight,  # contiguous, requires grad
        "b": torch.nn.Parameter(torch.zeros(4, 2))[:, 0],  # a strided view of a parameter
        "mask": torch.zeros(2, 2, dtype=torch.bool).mT,  # strided: goes through a host tensor
        "z": torch.zeros(2, dtype=torch.complex64).conj(),  # lazy conjugate bit
    }
    loaded = load_pytree(path, out=out)
    assert all(loaded[k] is out[k] for k in out)
    assert torch.equal(model.weight.detach(), saved["w"]) and model.weight._version > weight_version
    assert torch.equal(out["b"].detach(), saved["b"])
    assert out["mask"].view(torch.uint8).tolist() == saved["mask"].view(torch.uint8).tolist()  # bytes kept
    assert torch.equal(out["z"].resolve_conj(), saved["z"])


def test_tied_and_overlapping_targets(tmp_path):
    path = tmp_path / "t.msgpack"
    emb = torch.randn(5, 3)
    save_pytree(path, {"embed": emb, "head": emb, "other": torch.ones(3)})
    tied = torch.zeros(5, 3)
    loaded = load_pytree(path, out={"embed": tied, "head": tied, "other": torch.zeros(3)})
    assert loaded["embed"] is tied and loaded["head"] is tied and torch.equal(tied, emb)
    untied = tmp_path / "u.msgpack"
    save_pytree(untied, {"embed": emb, "head": emb + 1, "other": torch.ones(3)})
    with pytest.raises(ValueError, match="embed and head: overlapping memory in out"):
        load_pytree(untied, out={"embed": tied, "head": tied, "other": torch.zeros(3)})
    big = torch.zeros(20)
    overlapping = {"embed": big[:15].view(5, 3), "head": big[3:18].view(5, 3), "other": torch.zeros(3)}
    with pytest.raises(ValueError, match="embed and head: overlapping memory in out"):
        load_pytree(untied, out=overlapping)
    assert not big.any()
    rest = {"embed": torch.zeros(5, 3), "head": torch.zeros(5, 3)}
    with pytest.raises(ValueError, match="other: several of its elements share memory"):
        load_pytree(untied, out={**rest, "other": torch.zeros(1).expand(3)})
    with pytest.raises(ValueError, match="other: a meta tensor"):
        load_pytree(untied, out={**rest, "other": torch.empty(3, device="meta")})
    with pytest.raises(ValueError, match="other: a torch.sparse_coo tensor"):
        load_pytree(untied, out={**rest, "other": torch.zeros(3).to_sparse()})
    assert not rest["embed"].any()


def test_a_damaged_file_leaves_the_out_tensors_untouched(tmp_path):
    path = tmp_path / "d.msgpack"
    save_pytree(path, {"a": torch.arange(1000.0), "b": torch.arange(50_000.0)})
    raw = bytearray(path.read_bytes())
    at = raw.find(torch.tensor([49_000.0]).numpy().tobytes())  # inside b's payload, the last tensor
    raw[at] ^= 1
    path.write_bytes(bytes(raw))
    out = {"a": torch.full((1000,), -1.0), "b": torch.full((50_000, 2), -1.0)[:, 0]}  # b strided
    with pytest.raises(CheckpointError, match="checksum mismatch in tensor 'b'"):
        load_pytree(path, out=out)
    assert bool((out["a"] == -1).all()) and bool((out["b"] == -1).all())
    load_pytree(path, out=out, verify=False)  # unchecked, the damage lands
    assert out["a"][999] == 999 and out["b"][49_000] != 49_000


def test_bytes_changed_between_the_check_and_the_copy_are_caught(tmp_path, monkeypatch):
    path = tmp_path / "r.msgpack"
    save_pytree(path, {"a": torch.arange(300_000.0)})
    at = path.read_bytes().find(torch.tensor([1234.0]).numpy().tobytes())
    checked = PytreeReader._read_many

    def overwrite_after_the_check(self, reads, verify, **how):
        checked(self, reads, verify, **how)
        if all(dest is None for _, _, _, dest in reads):  # the checking pass: now change the file in place
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(b"\x00\x00\x00\x00")

    monkeypatch.setattr(PytreeReader, "_read_many", overwrite_after_the_check)
    with pytest.raises(CheckpointError, match="checksum mismatch in tensor 'a'"):
        load_pytree(path, out={"a": torch.zeros(300_000)})


@given(
    numel=st.integers(0, 2000),
    block=st.integers(64, 700),
    chunk=st.integers(64, 5000),
    data=st.data(),
)
def test_chunked_tensors_and_element_ranges(tmp_path_factory, numel, block, chunk, data):
    chunk -= chunk % 8  # chunks hold whole bytes; any size works, keep float64 readable per chunk
    t = torch.randn(numel, dtype=torch.float64)
    path = tmp_path_factory.mktemp("ch") / "t.msgpack"
    written = write_pytree(
        path, {"t": t, "s": t[:3].float()}, fsync=False, block_bytes=block, max_chunk_bytes=chunk
    )
    assert sum(n for _, n in written.records[0].extents) == numel * 8
    start = data.draw(st.integers(0, numel))
    stop = data.draw(st.integers(start, numel))
    with PytreeReader(path) as reader:
        assert torch.equal(reader.tensor("t"), t)
        assert torch.equal(reader.read_elements("t", start, stop), t[start:stop])
        reader.check_elements("t", start, stop)
        with pytest.raises(ValueError, match="outside tensor"):
            reader.check_elements("t", start, numel + 1)
        out = torch.full((stop - start,), -1.0, dtype=torch.float64)
        reader.read_elements("t", start, stop, out=out, verify=False)
        assert torch.equal(out, t[start:stop])
        assert reader.checksum == written.checksum and reader.paths == {"t": 0, "s": 1}


def test_mmap_tensors_are_aligned_writable_and_outlive_the_reader(tmp_path):
    path = tmp_path / "m.msgpack"
    save_pytree(path, {"a": torch.arange(10.0), "b": [torch.ones(3, dtype=torch.float64)]})
    with PytreeReader(path) as reader:
        a = reader.tensor("a", copy=False)
        b = reader.tensor("b/0", copy=False)
    assert a.data_ptr() % 64 == 0 and b.data_ptr() % 64 == 0
    a += 1  # private copy-on-write mapping: the file is unchanged
    assert torch.equal(a, torch.arange(1.0, 11.0)) and torch.equal(b, torch.ones(3, dtype=torch.float64))
    assert torch.equal(load_pytree(path)["a"], torch.arange(10.0))


def test_out_tensor_is_filled_in_place(tmp_path):
    path = tmp_path / "o.msgpack"
    save_pytree(path, {"w": torch.arange(12, dtype=torch.int32).reshape(3, 4)})
    out = torch.zeros(3, 4, dtype=torch.int32)
    with PytreeReader(path) as reader:
        assert reader.tensor("w", out=out) is out
        with pytest.raises(ValueError, match="out must be"):
            reader.tensor("w", out=torch.zeros(3, 4))
        with pytest.raises(CheckpointError, match="no tensor at path 'nope'"):
            reader.tensor("nope")
    assert torch.equal(out, torch.arange(12, dtype=torch.int32).reshape(3, 4))


def test_bad_inputs_raise_type_and_value_errors_naming_the_path(tmp_path):
    with pytest.raises(TypeError, match="a/0: cannot store a set"):
        save_pytree(tmp_path / "x", {"a": [{1}]})
    with pytest.raises(TypeError, match="dict keys must be str"):
        save_pytree(tmp_path / "x", {"a": {1: 2}})
    with pytest.raises(ValueError, match="b: integer .* 64 bits"):
        save_pytree(tmp_path / "x", {"b": 2**64})
    with pytest.raises(TypeError, match="sparse_coo tensor"):
        save_pytree(tmp_path / "x", torch.ones(2).to_sparse())
    assert os.listdir(tmp_path) == []  # no temporary file left behind


def _small_file(tmp_path):
    path = tmp_path / "small.msgpack"
    tree = {
        "w": torch.arange(24, dtype=torch.float32).reshape(4, 6),
        "meta": ("x", 1, None),
        "b": torch.ones(3),
    }
    save_pytree(path, tree)
    return path, path.read_bytes(), tree


def test_every_flipped_byte_is_detected(tmp_path):
    path, data, tree = _small_file(tmp_path)
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x10
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match="small.msgpack: ") as info:
            load_pytree(path)
        assert str(path) in str(info.value), i
    path.write_bytes(data)
    assert_same(tree, load_pytree(path))


def test_every_truncation_is_detected(tmp_path):
    path, data, _ = _small_file(tmp_path)
    for n in range(len(data)):
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=r"truncated|magic"):
            load_pytree(path)


def test_a_file_truncated_while_open_raises_instead_of_faulting(tmp_path):
    path = tmp_path / "p.msgpack"
    write_pytree(path, {"w": torch.arange(100_000.0)})
    with PytreeReader(path) as reader:
        os.truncate(path, reader.nbytes // 2)  # reading the mapping past the new end would be a SIGBUS
        with pytest.raises(CheckpointError, match="changed size while open"):
            reader.tensor("w")


def test_wrong_magic_version_and_missing_file(tmp_path):
    path, data, _ = _small_file(tmp_path)
    path.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(CheckpointError, match="wrong magic"):
        load_pytree(path)
    version_at = len(data) - TRAILER_LEN + 2 + 20
    path.write_bytes(data[:version_at] + struct.pack("<I", 2) + data[version_at + 4 :])
    with pytest.raises(CheckpointError, match="unsupported format version 2"):
        load_pytree(path)
    with pytest.raises(CheckpointError, match="file not found"):
        load_pytree(tmp_path / "absent.msgpack")


def test_damage_in_a_payload_names_the_tensor_even_without_full_verification(tmp_path):
    path = tmp_path / "p.msgpack"
    written = write_pytree(path, {"x": {"w": torch.zeros(1000)}}, block_bytes=256)
    offset = written.records[0].extents[0][0] + 700
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x01")
    with pytest.raises(CheckpointError, match="checksum mismatch in tensor 'x/w' \\(block 2 of 16\\)"):
        load_pytree(path)
    with PytreeReader(path) as reader:
        assert torch.equal(reader.read_elements("x/w", 0, 128), torch.zeros(128))  # blocks 0-1 are intact
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            reader.read_elements("x/w", 190, 191)
    assert load_pytree(path, verify=False)["x"]["w"].count_nonzero() == 1  # verify=False trusts the data


def test_disk_full_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state.msgpack"
    save_pytree(path, {"v": torch.ones(100)})
    real_write_all, written = writer_mod.write_all, [0]

    def full_disk(fd, data):
        written[0] += len(data)
        if written[0] > 300:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_all(fd, data)

    monkeypatch.setattr(writer_mod, "write_all", full_disk)
    with pytest.raises(CheckpointError, match="state.msgpack: write failed: .*No space left"):
        save_pytree(path, {"v": torch.zeros(1000)})
    assert os.listdir(tmp_path) == ["state.msgpack"]
    assert torch.equal(load_pytree(path)["v"], torch.ones(100))


def test_parallel_block_reads_and_checksums_on_a_large_tensor(tmp_path):
    """Ranges over 1 MiB are read and checksummed block by block in worker threads: every block's crc
    must equal zlib's serial one, and a flipped byte anywhere is still caught on every read path."""
    import zlib

    block = 1 << 20
    t = torch.randn((12 * block + 3000) // 4, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "big.msgpack"
    written = write_pytree(path, {"w": t, "n": 5}, fsync=False, block_bytes=block)
    raw = t.numpy().tobytes()
    rec = written.records[0]
    assert rec.crcs == tuple(zlib.crc32(raw[i : i + block]) for i in range(0, len(raw), block))
    assert os.path.getsize(path) == written.nbytes  # preallocation left no stray bytes
    assert torch.equal(load_pytree(path)["w"], t)
    assert torch.equal(load_pytree(path, mmap=True)["w"], t)
    with PytreeReader(path) as reader:
        reader.verify()
        out = torch.empty_like(t)
        assert reader.tensor("w", out=out) is out and torch.equal(out, t)
        assert torch.equal(reader.read_elements("w", 100_001, 2_900_000), t[100_001:2_900_000])

    offset = rec.extents[0][0] + 7 * block + 12345  # inside block 7
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([raw[7 * block + 12345] ^ 0x01]))

    def with_reader(fn):
        with PytreeReader(path) as reader:
            fn(reader)

    for load in (
        lambda: load_pytree(path),
        lambda: load_pytree(path, mmap=True),
        lambda: with_reader(lambda r: r.verify()),
        lambda: with_reader(lambda r: r.read_elements("w", 0, len(t))),
        lambda: with_reader(lambda r: r.read_elements("w", 7 * block // 4 + 5000, 9 * block // 4)),
    ):
        with pytest.raises(CheckpointError, match=r"big.msgpack: checksum mismatch in tensor 'w' \(block 7 "):
            load()
    with PytreeReader(path) as reader:  # ranges that avoid block 7 still load
        assert torch.equal(reader.read_elements("w", 0, 7 * block // 4), t[: 7 * block // 4])
        assert torch.equal(reader.read_elements("w", 8 * block // 4, len(t)), t[8 * block // 4 :])
    assert (load_pytree(path, verify=False)["w"] != t).sum() == 1


def test_preallocation_failure_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state.msgpack"
    save_pytree(path, {"v": torch.ones(100)})

    def no_space(fd, nbytes):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_mod, "preallocate", no_space)
    with pytest.raises(CheckpointError, match="state.msgpack: write failed: .*No space left"):
        save_pytree(path, {"v": torch.zeros(1000)})
    assert os.listdir(tmp_path) == ["state.msgpack"]
    assert torch.equal(load_pytree(path)["v"], torch.ones(100))
