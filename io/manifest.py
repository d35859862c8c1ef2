"""What a checkpoint directory holds, and the checks that it is whole and self-consistent.

    <save_dir>/latest                  the current tag, written last (atomically)
    <save_dir>/<tag>/manifest.msgpack  a pytree file: id, world size, leaf table, per-file checksums, meta
    <save_dir>/<tag>/rank_00000.msgpack  rank 0's pytree: the whole tree (replicated leaves and its shards)
    <save_dir>/<tag>/rank_0000r.msgpack  rank r > 0: {leaf path: its shard} of the flat-sharded leaves only

A *flat* leaf is one rank's equal part of a logical 1-D tensor of ``numel`` elements: every rank holds
``shard_numel(numel, world_size)`` elements (a multiple of 16), the last parts zero-padded; the leaf
table records that length, which reads go by. Every other leaf is *replicated* and only rank 0 writes
it. Leaf paths join dict keys and list indices with '/'.
"""

from __future__ import annotations

import os
import platform
import stat
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from zerostep.io.codec import TensorRecord, dtype_name
from zerostep.io.errors import CheckpointError
from zerostep.io.files import check_save_dir, open_regular
from zerostep.io.reader import PytreeReader, load_pytree

MANIFEST = "manifest.msgpack"
LATEST = "latest"
FORMAT = "zerostep.checkpoint"
VERSION = 1


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.msgpack"


# Flat shards hold a multiple of this many elements, so every rank's part starts 16-byte aligned in any
# dtype. The same constant as ``zerostep.parallel.flat.ALIGN_ELEMENTS`` (io does not import parallel).
SHARD_ALIGN = 16


def shard_numel(numel: int, world_size: int) -> int:
    """Elements per rank of a flat tensor: ``ceil(numel / world_size)`` rounded up to a multiple of
    ``SHARD_ALIGN`` (at least that); the same rule as ``zerostep.parallel.flat.FlatLayout.shard_numel``.
    Checkpoints written before the rounding record their own shard size, which reads use."""
    return -(-max(1, -(-numel // world_size)) // SHARD_ALIGN) * SHARD_ALIGN


def tensor_digest(record: TensorRecord) -> int:
    """One crc32 standing for a tensor: the crc of its block crcs."""
    return zlib.crc32(struct.pack(f"<{len(record.crcs)}I", *record.crcs))


def versions() -> dict[str, str]:
    import zerostep

    return {
        "zerostep": zerostep.__version__,
        "torch": torch.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "python": platform.python_version(),
    }


def tensor_leaves(tree: Any) -> dict[str, torch.Tensor]:
    """Every tensor in ``tree`` by '/'-joined path, in tree order; paths must be unique."""
    out: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, torch.Tensor):
            if path in out:
                raise ValueError(f"two tensors share the leaf path {path!r} (a key contains '/'?)")
            out[path] = node
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{path}/{k}" if path else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}" if path else str(i))

    walk(tree, "")
    return out


def describe_leaves(tree: Any, flat_numel: Mapping[str, int], world_size: int) -> dict[str, dict]:
    """The manifest's leaf table: path -> {kind, dtype, shape[, numel, shard_numel]}; checks shard sizes."""
    leaves = tensor_leaves(tree)
    unknown = sorted(set(flat_numel) - set(leaves))
    if unknown:
        raise ValueError(f"flat_numel names paths that are not tensors in the tree: {unknown}")
    table = {}
    for path, t in leaves.items():
        entry = {"kind": "replicated", "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
        if path in flat_numel:
            numel, expect = int(flat_numel[path]), shard_numel(int(flat_numel[path]), world_size)
            if t.dim() != 1 or t.numel() != expect:
                raise ValueError(
                    f"{path}: a flat shard of {numel} elements over {world_size} ranks must be 1-D with "
                    f"{expect} elements, got shape {tuple(t.shape)}"
                )
            entry.update(kind="flat", numel=numel, shard_numel=expect)
        table[path] = entry
    return table


def rank_tree(tree: Any, table: Mapping[str, dict], rank: int) -> Any:
    """What rank ``rank`` writes: rank 0 the whole tree, others {path: shard} of the flat leaves."""
    if rank == 0:
        return tree
    leaves = tensor_leaves(tree)
    return {p: leaves[p] for p, e in table.items() if e["kind"] == "flat"}


def selected(path: str, leaves: Iterable[str] | None) -> bool:
    """Is ``path`` one of ``leaves`` or below one of them (None selects everything)?"""
    return leaves is None or any(path == p or path.startswith(p.rstrip("/") + "/") for p in leaves)


class InvalidTagError(CheckpointError, ValueError):
    """A tag that is not one plain folder name of the save folder (also a ``ValueError``: a bad argument)."""


def check_tag(path: str | os.PathLike, tag: Any, where: str = "tag") -> str:
    """``tag`` if it names a folder directly inside a save folder: one path component, not '.', '..',
    'latest' or hidden, no surrounding whitespace or NUL, at most 255 bytes. Otherwise an
    ``InvalidTagError`` for ``path`` (the save folder, or the file the tag was read from) naming it;
    ``where`` says what the tag is."""
    reason = None
    if not isinstance(tag, str):
        reason = f"must be a str, got {type(tag).__name__}"
    elif not tag:
        reason = "is empty"
    elif tag != tag.strip():
        reason = "has leading or trailing whitespace"
    elif "/" in tag or (os.sep != "/" and os.sep in tag) or (os.altsep and os.altsep in tag):
        reason = "is a path, not a single folder name inside the save folder"
    elif "\0" in tag:
        reason = "holds a NUL character"
    elif tag.startswith("."):
        reason = "starts with '.' (hidden names and '..' are reserved for temporary files)"
    elif tag == LATEST:
        reason = f"{LATEST!r} names the file that points at the current tag"
    elif len(tag.encode("utf-8", "surrogatepass")) > 255:
        reason = "is longer than 255 bytes"
    if reason is not None:
        raise InvalidTagError(path, f"invalid checkpoint {where} {tag!r}: {reason}")
    return tag


_LATEST_MAX_BYTES = 4096


def read_latest(save_dir: str | os.PathLike) -> str:
    """The tag ``<save_dir>/latest`` names (checked by ``check_tag``); one trailing newline is allowed."""
    save_dir = check_save_dir(save_dir)
    path = os.path.join(save_dir, LATEST)
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise CheckpointError(path, "no 'latest' file: pass a tag or save a checkpoint first") from None
    try:
        raw = os.read(fd, _LATEST_MAX_BYTES + 1)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(raw) > _LATEST_MAX_BYTES:
        raise CheckpointError(path, f"more than {_LATEST_MAX_BYTES} bytes: not a 'latest' file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(path, "not UTF-8 text: not a 'latest' file (damaged?)") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise CheckpointError(path, "the 'latest' file is empty")
    return check_tag(path, text, where="tag in 'latest'")


@dataclass
class CheckpointDir:
    """An opened checkpoint directory: its manifest, checked, and its rank files opened on demand."""

    path: str
    manifest: dict
    _readers: dict[int, PytreeReader]
    verify: bool = True  # check each rank file's frame (structure bytes) when it is opened

    @staticmethod
    def open(save_dir: str | os.PathLike, tag: str | None = None, *, verify: bool = True) -> CheckpointDir:
        """Checkpoint ``tag`` of ``save_dir`` (default: the one ``latest`` names): a folder directly
        inside ``save_dir`` (``check_tag``), its manifest read and checked."""
        save_dir = check_save_dir(save_dir)
        tag = read_latest(save_dir) if tag is None else check_tag(save_dir, tag)
        path = os.path.join(save_dir, tag)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise CheckpointError(path, "checkpoint directory not found") from None
        except OSError as e:
            raise CheckpointError(path, f"cannot open the checkpoint directory: {e.strerror or e}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise CheckpointError(path, "not a directory, so not a checkpoint")
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.lexists(manifest_path):
            raise CheckpointError(manifest_path, "missing manifest: not a zerostep checkpoint")
        manifest = load_pytree(manifest_path)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(manifest_path, "not a zerostep checkpoint manifest")
        if manifest.get("version") != VERSION:
            raise CheckpointError(manifest_path, f"unsupported checkpoint version {manifest.get('version')}")
        ckpt = CheckpointDir(path, manifest, {}, verify)
        ckpt._check_files()
        return ckpt

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])

    @property
    def leaves(self) -> dict[str, dict]:
        return self.manifest["leaves"]

    def _check_files(self) -> None:
        expected = {rank_file(r) for r in range(self.world_size)}
        try:
            names = os.listdir(self.path)
        except OSError as e:
            raise CheckpointError(
                self.path, f"cannot list the checkpoint directory: {e.strerror or e}"
            ) from None
        present = {n for n in names if n.startswith("rank_") and n.endswith(".msgpack")}
        for name in sorted(expected - present):
            raise CheckpointError(
                os.path.join(self.path, name),
                f"missing shard (the manifest says world size {self.world_size})",
            )
        if present - expected:
            raise CheckpointError(
                self.path,
                f"unexpected shard files {sorted(present - expected)}: the manifest says world size "
                f"{self.world_size}, so these belong to another save",
            )

    def reader(self, rank: int) -> PytreeReader:
        """Rank ``rank``'s file, checked against the manifest (id, rank, world size, checksum)."""
        if rank not in self._readers:
            path = os.path.join(self.path, rank_file(rank))
            reader = PytreeReader(path)
            want = self.manifest["files"][rank]
            meta = reader.meta if isinstance(reader.meta, dict) else {}
            if meta.get("checkpoint_id") != self.manifest["checkpoint_id"]:
                reader.close()
                raise CheckpointError(
                    path,
                    f"shard from another checkpoint (id {meta.get('checkpoint_id')!r}, the manifest "
                    f"says {self.manifest['checkpoint_id']!r})",
                )
            if meta.get("rank") != rank or meta.get("world_size") != self.world_size:
                reader.close()
                raise CheckpointError(path, f"shard of rank {meta.get('rank')}/{meta.get('world_size')}")
            if reader.checksum != want["checksum"] or reader.nbytes != want["nbytes"]:
                reader.close()
                raise CheckpointError(
                    path, "file checksum or size differs from the manifest (replaced file?)"
                )
            if self.verify:  # the structure bytes: a few hundred bytes per tensor, whatever is read
                try:
                    reader.verify_frame()
                except BaseException:
                    reader.close()
                    raise
            self._readers[rank] = reader
        return self._readers[rank]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> CheckpointDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
