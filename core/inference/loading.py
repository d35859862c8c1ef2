"""``init_inference(checkpoint=...)``: weights into the module, each rank reading only its own shards.

A ``WeightSource`` gives the names and full shapes of a checkpoint's tensors and reads any tensor's
slices along one dim (``read(name, dim, ranges)``: the concatenation along ``dim`` of the index ranges,
which is what a ``ShardSpec`` of rank ``r`` asks for, fused parts included), without ever holding the
whole tensor:

- a zerostep training checkpoint directory (a ``save_dir`` with ``latest``, any world size and ZeRO
  stage): every parameter lies at an offset of a flat fp32 master leaf spread over the ranks' files
  (``meta["layouts"]``, see ``io/export.py``). A split of dim 0 (column-parallel rows, vocab rows, each
  fused part) is one element range per part, read by ``io.reshard.read_flat_range`` from just the
  files and checksum blocks it overlaps; a split of a later dim (row-parallel columns) reads whole rows
  a chunk of ``_CHUNK_BYTES`` at a time and keeps this rank's columns, so the transient is one chunk;
- a ``.safetensors`` file: ``safe_open(...).get_slice(name)[..., a:b]`` reads just those bytes;
- a ``torch.save`` state dict (``.pt``/``.pth``/``.bin``): loaded with ``mmap=True`` (the file's pages,
  not a copy), slices copied out.

``check_matches`` compares the source with the module's full (pre-sharding) names and shapes and lists
what differs (a checkpoint of another model). ``load_weights`` then fills every parameter of the
(possibly sharded) module: a real parameter in place, a ``meta`` one (a model built on the meta device or
under ``zerostep.zero.Init``) replaced by a new parameter holding just its shard, so a rank's peak is its
shards plus one chunk, not the model. Ties stay ties (one tensor read for all names).
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from zerostep.core import deferred_init
from zerostep.io import CheckpointError
from zerostep.io.codec import dtype_from_name
from zerostep.io.manifest import CheckpointDir
from zerostep.io.reshard import read_flat_range
from zerostep.parallel.tensor_parallel import ShardSpec

_FILE_EXTS = (".safetensors", ".pt", ".pth", ".bin")
_CHUNK_BYTES = 4 << 20  # rows read at a time for a split of a later dim

Ranges = Sequence[tuple[int, int]]


def _sliced_shape(shape: Sequence[int], dim: int, ranges: Ranges) -> list[int]:
    out = list(shape)
    out[dim] = sum(b - a for a, b in ranges)
    return out


class WeightSource(abc.ABC):
    """A checkpoint's tensors by name: ``shapes`` (full), ``read`` (slices along one dim)."""

    path: str
    shapes: dict[str, tuple[int, ...]]

    @abc.abstractmethod
    def read(self, name: str, dim: int | None = None, ranges: Ranges = ()) -> torch.Tensor:
        """The whole tensor (``dim`` None) or the concatenation along ``dim`` of ``[a, b)`` for each
        range, as new memory."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the files (reads after this fail)."""

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ZeroCheckpointSource(WeightSource):
    """The fp32 master weights of a zerostep training checkpoint, at any world size and stage."""

    def __init__(self, path: str, tag: str | None = None):
        self.path = path
        self._ckpt = CheckpointDir.open(path, tag)
        layouts = self._ckpt.manifest["meta"].get("layouts")
        if not isinstance(layouts, dict) or not layouts:
            self._ckpt.close()
            raise CheckpointError(self._ckpt.path, "the manifest's meta has no 'layouts': no named weights")
        self._where: dict[str, tuple[str, int, torch.dtype]] = {}  # name -> (flat leaf, offset, dtype)
        self.shapes = {}
        for group, layout in layouts.items():
            leaf = f"master/{group}"
            entry = self._ckpt.leaves.get(leaf)
            if entry is None or entry["kind"] != "flat":
                self._ckpt.close()
                raise CheckpointError(self._ckpt.path, f"layout group {group!r} has no flat leaf {leaf!r}")
            for name, shape, offset in layout["entries"]:
                if offset + math.prod(shape) > entry["numel"]:
                    self._ckpt.close()
                    raise CheckpointError(self._ckpt.path, f"{name}: layout reaches past the end of {leaf!r}")
                self._where[name] = (leaf, int(offset), dtype_from_name(entry["dtype"]))
                self.shapes[name] = tuple(shape)

    def _flat(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Elements [start, stop) of ``name``'s row-major values into the contiguous ``out``."""
        leaf, offset, _ = self._where[name]
        read_flat_range(self._ckpt, leaf, offset + start, offset + stop, out.view(-1), self._ckpt.verify)

    def read(self, name: str, dim: int | None = None, ranges: Ranges = ()) -> torch.Tensor:
        shape, dtype = self.shapes[name], self._where[name][2]
        if dim is None:
            out = torch.empty(shape, dtype=dtype)
            self._flat(name, 0, out.numel(), out)
            return out
        outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1 :])  # [outer, shape[dim], inner]
        width = shape[dim]
        out = torch.empty(outer, sum(b - a for a, b in ranges), inner, dtype=dtype)
        if outer == 1:  # each range is one run of elements
            at = 0
            for a, b in ranges:
                self._flat(name, a * inner, b * inner, out[0, at : at + b - a])
                at += b - a
        else:  # whole rows, a chunk at a time; this rank's columns kept
            rows = max(1, _CHUNK_BYTES // (width * inner * dtype.itemsize))
            for r0 in range(0, outer, rows):
                r1 = min(outer, r0 + rows)
                chunk = torch.empty(r1 - r0, width, inner, dtype=dtype)
                self._flat(name, r0 * width * inner, r1 * width * inner, chunk)
                at = 0
                for a, b in ranges:
                    out[r0:r1, at : at + b - a] = chunk[:, a:b]
                    at += b - a
        return out.view(_sliced_shape(shape, dim, ranges))

    def close(self) -> None:
        self._ckpt.close()


class SafetensorsSource(WeightSource):
    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(path, framework="pt")
        self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}

    def read(self, name: str, dim: int | None = None, ranges: Ranges = ()) -> torch.Tensor:
        if dim is None:
            return self._file.get_tensor(name)
        part = self._file.get_slice(name)
        lead = (slice(None),) * dim
        pieces = [part[(*lead, slice(a, b))] for a, b in ranges]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)

    def close(self) -> None:
        self._file = None  # safe_open's mapping goes with its last reference


class StateDictSource(WeightSource):
    def __init__(self, path: str):
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(path, "not a state dict of tensors")
        self._state = state
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}

    def read(self, name: str, dim: int | None = None, ranges: Ranges = ()) -> torch.Tensor:
        full = self._state[name]
        if dim is None:
            return full.clone()
        return torch.cat([full.narrow(dim, a, b - a) for a, b in ranges], dim)  # a copy

    def close(self) -> None:
        self._state = {}  # the mapped file goes with its tensors


def open_weights(path: str, tag: str | None = None) -> WeightSource:
    """The ``WeightSource`` of a zerostep checkpoint directory or a weights file."""
    if os.path.isdir(path):
        return ZeroCheckpointSource(path, tag)
    if not os.path.exists(path):
        raise CheckpointError(path, "checkpoint not found")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        return SafetensorsSource(path)
    if ext in _FILE_EXTS:
        return StateDictSource(path)
    raise CheckpointError(path, f"not a checkpoint directory nor a {'/'.join(_FILE_EXTS)} file")


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def alias_groups(module: nn.Module) -> list[list[str]]:
    """The names of each parameter (tied ones share a group), in the module's order."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return list(by_id.values())


def full_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter name (aliases too) -> its shape; taken before sharding, they are the full ones."""
    return {n: tuple(p.shape) for n, p in module.named_parameters(remove_duplicate=False)}


def check_matches(
    source: WeightSource, shapes: Mapping[str, tuple[int, ...]], groups: Sequence[Sequence[str]]
) -> None:
    """Raise ``CheckpointError`` listing what differs when ``source`` is not a checkpoint of the model
    whose full parameter ``shapes`` (every alias) and tie ``groups`` are given."""
    missing = sorted(g[0] for g in groups if not any(n in source.shapes for n in g))
    unexpected = sorted(n for n in source.shapes if n not in shapes)
    wrong = sorted(
        f"{n}: checkpoint {list(s)} vs model {list(shapes[n])}"
        for n, s in source.shapes.items()
        if n in shapes and s != shapes[n]
    )
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_listed(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_listed(unexpected)}")
    if wrong:
        problems.append(f"shapes differ: {_listed(wrong)}")
    if problems:
        raise CheckpointError(source.path, "the checkpoint is of another model; " + "; ".join(problems))


def shard_ranges(full_len: int, spec: ShardSpec, rank: int) -> list[tuple[int, int]]:
    """The index ranges along ``spec.dim`` that rank ``rank``'s shard holds, part by part when fused
    (``parallel.tensor_parallel.shard_of_full``'s layout: ``[q_r; k_r; v_r]``)."""
    parts, ranges, start = spec.fused or (full_len,), [], 0
    for part in parts:
        local = part // spec.tp_size
        ranges.append((start + rank * local, start + (rank + 1) * local))
        start += part
    return ranges


def _read_shard(source: WeightSource, name: str, spec: ShardSpec | None, rank: int) -> torch.Tensor:
    if spec is None or not spec.sharded:
        return source.read(name)
    return source.read(name, spec.dim, shard_ranges(source.shapes[name][spec.dim], spec, rank))


def _set_parameter(module: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    (module.get_submodule(owner) if owner else module)._parameters[leaf] = param


def load_weights(
    module: nn.Module,
    source: WeightSource,
    groups: Sequence[Sequence[str]],
    specs: Mapping[str, ShardSpec] | None = None,
    rank: int = 0,
) -> int:
    """Fill every parameter of ``module`` (already sharded when ``specs`` are given) with its shard from
    ``source``; ``groups``: the tie groups of the full module (``check_matches`` passed). Returns how
    many tensors were read."""
    for names in groups:
        present = next(n for n in names if n in source.shapes)
        spec = None if specs is None else specs[present]
        value = _read_shard(source, present, spec, rank)
        param = module.get_parameter(names[0])
        if param.is_meta:
            new = nn.Parameter(value, requires_grad=False)
            for n in names:
                _set_parameter(module, n, new)
        else:
            with torch.no_grad():
                param.copy_(value)
    return len(groups)


def materialize_buffers(module: nn.Module) -> None:
    """Give the recorded meta buffers of a model built under ``zerostep.zero.Init`` their values (a
    meta buffer nothing recorded is a ``ValueError`` naming it)."""
    done: dict[int, torch.Tensor] = {}
    for path, sub in module.named_modules():
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_meta:
                if id(b) not in done:
                    try:
                        done[id(b)] = deferred_init.materialize(b)
                    except ValueError as e:
                        where = f"{path}.{name}" if path else name
                        raise ValueError(f"init_inference: buffer {where}: {e}") from None
                sub._buffers[name] = done[id(b)]


def materialize_parameters(module: nn.Module) -> None:
    """Without a checkpoint: the recorded values of every meta parameter (a model built under
    ``zerostep.zero.Init``), whole; a meta parameter nothing recorded is a ``ValueError``."""
    for names in alias_groups(module):
        p = module.get_parameter(names[0])
        if p.is_meta:
            try:
                new = nn.Parameter(deferred_init.materialize(p), requires_grad=False)
            except ValueError as e:
                raise ValueError(f"init_inference: parameter {names[0]} (and no checkpoint=): {e}") from None
            for n in names:
                _set_parameter(module, n, new)
