"""What a checkpoint directory holds, and the checks that it is whole and self-consistent.

    <save_dir>/latest                  the current tag, written last (atomically)
    <save_dir>/<tag>/manifest.msgpack  a pytree file: id, world size, leaf table, per-file checksums, meta
    <save_dir>/<tag>/rank_00000.msgpack  rank 0's pytree: the whole tree (replicated leaves and its shards)
    <save_dir>/<tag>/rank_0000r.msgpack  rank r > 0: {leaf path: its shard} of the flat-sharded leaves only

A *flat* leaf is one rank's equal part of a logical 1-D tensor of ``numel`` elements: every rank holds
``shard_numel(numel, world_size)`` elements, the last part zero-padded. Every other leaf is *replicated*
and only rank 0 writes it. Leaf paths join dict keys and list indices with '/'.
"""

from __future__ import annotations

import os
import platform
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from zerostep.io.codec import TensorRecord, dtype_name
from zerostep.io.errors import CheckpointError
from zerostep.io.reader import PytreeReader, load_pytree

MANIFEST = "manifest.msgpack"
LATEST = "latest"
FORMAT = "zerostep.checkpoint"
VERSION = 1


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.msgpack"


def shard_numel(numel: int, world_size: int) -> int:
    """Elements per rank of a flat tensor; the same rule as ``zerostep.parallel.flat.FlatLayout``."""
    return max(1, -(-numel // world_size))


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


def read_latest(save_dir: str | os.PathLike) -> str:
    path = os.path.join(save_dir, LATEST)
    try:
        with open(path) as f:
            tag = f.read().strip()
    except FileNotFoundError:
        raise CheckpointError(path, "no 'latest' file: pass a tag or save a checkpoint first") from None
    if not tag:
        raise CheckpointError(path, "the 'latest' file is empty")
    return tag


@dataclass
class CheckpointDir:
    """An opened checkpoint directory: its manifest, checked, and its rank files opened on demand."""

    path: str
    manifest: dict
    _readers: dict[int, PytreeReader]

    @staticmethod
    def open(save_dir: str | os.PathLike, tag: str | None = None) -> CheckpointDir:
        tag = read_latest(save_dir) if tag is None else tag
        path = os.path.join(os.fspath(save_dir), tag)
        if not os.path.isdir(path):
            raise CheckpointError(path, "checkpoint directory not found")
        if not os.path.exists(os.path.join(path, MANIFEST)):
            raise CheckpointError(os.path.join(path, MANIFEST), "missing manifest: not a zerostep checkpoint")
        manifest = load_pytree(os.path.join(path, MANIFEST))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(os.path.join(path, MANIFEST), "not a zerostep checkpoint manifest")
        if manifest.get("version") != VERSION:
            raise CheckpointError(
                os.path.join(path, MANIFEST), f"unsupported checkpoint version {manifest.get('version')}"
            )
        ckpt = CheckpointDir(path, manifest, {})
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
        present = {n for n in os.listdir(self.path) if n.startswith("rank_") and n.endswith(".msgpack")}
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
