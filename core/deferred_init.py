"""Build a model without its memory, then materialize it a piece at a time with exactly its own values.

``DeferredInit`` (what ``zerostep.zero.Init`` enters) builds modules on the ``meta`` device, so no
parameter or buffer gets memory, and records every operation that creates or writes such a tensor: the
``empty`` of each parameter, the ``uniform_`` of ``reset_parameters``, a model's own ``apply(init_fn)``
(``normal_``, ``zero_``, ``fill_``), ``copy_`` from real tensors, buffers such as
``torch.tril(torch.ones(n, n))``. ``materialize(t)`` later replays just the operations that made
``t``'s storage (and those it depends on, as they were when used) on the CPU, so the engine can build
one ZeRO unit at a time and no rank ever holds the whole model.

The values are the ones a normal construction gives with the same seed. Random operations draw from the
global generator in construction order: each one recorded here also runs, once, on a scratch CPU tensor
of its shape, so the generator advances exactly as it would have, and the generator state before it is
kept to replay it. Limits: code that reads a value during construction (``.item()``, ``if t.sum() >
0``) cannot run on ``meta``; randomness from Python's ``random`` or NumPy is not recorded (it runs
once, at construction, and meta tensors cannot hold what it produced unless it was copied in from a
real tensor, which is recorded).

Storages are the unit of identity: a parameter, its ``.data`` and every view of it share one storage,
so a write through any of them is replayed into the storage they share.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import optree
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# storage key -> the recorder that holds how to build it; the recorder keeps its meta storages alive, so
# keys are not reused, until ``forget`` (the engine calls it once the model is materialized)
_RECORDERS: dict[int, Recorder] = {}


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _is_random(func: Any) -> bool:
    return any(a.name == "generator" for a in func._schema.arguments)


def _written_args(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor arguments ``func`` writes in place (``self`` of ``uniform_``, ``out=`` ...)."""
    written = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(a.name)
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor):
                written.append(t)
    return written


@dataclass(frozen=True)
class _MetaRef:
    """A recorded op's meta tensor argument: which storage, and its view of it. Ops keep these, not the
    tensors: a view holds its base alive, which would pin the parameter ``bind_module`` replaces."""

    key: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> _MetaRef:
        return _MetaRef(_key(t), tuple(t.size()), tuple(t.stride()), t.storage_offset(), t.dtype)


def _refs(tree: Any) -> Any:
    return optree.tree_map(
        lambda a: _MetaRef.of(a) if isinstance(a, torch.Tensor) and a.is_meta else a, tree, none_is_leaf=True
    )


@dataclass
class _Op:
    index: int
    func: Any
    args: tuple
    kwargs: dict
    rng: torch.Tensor | None  # the default generator's state before a random op
    generator: torch.Generator | None = None  # an explicit generator= of a random op, and its state
    generator_state: torch.Tensor | None = None


@dataclass
class _Created:
    op: int  # index into the ops
    position: tuple  # where in the op's outputs the tensor sits (optree path)


@dataclass
class Recorder:
    """The operations that built a model's meta tensors, replayable one storage at a time."""

    ops: list[_Op] = field(default_factory=list)
    created: dict[int, _Created] = field(default_factory=dict)  # storage key -> its creation
    writes: dict[int, list[int]] = field(default_factory=dict)  # storage key -> op indices, in order
    tensors: list[torch.Tensor] = field(default_factory=list)  # keeps every recorded storage alive

    def knows(self, t: torch.Tensor) -> bool:
        return t.is_meta and _key(t) in self.created

    def materialize(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s value now, as a new CPU tensor of its shape and strides (its storage rebuilt)."""
        if not self.knows(t):
            raise ValueError("this tensor was not created under zerostep.zero.Init")
        with torch.random.fork_rng(devices=[]):
            root = self._storage(_key(t), len(self.ops), {})
        return _view(root, _MetaRef.of(t))

    # -- replay

    def _storage(self, key: int, upto: int, memo: dict) -> torch.Tensor:
        """The real storage ``key`` (as a tensor over all of it) after the recorded ops before ``upto``."""
        if (key, upto) in memo:
            return memo[key, upto]
        made = self.created[key]
        outputs = self._run(self.ops[made.op], memo, None, None)
        root = _at(outputs, made.position)
        for i in self.writes.get(key, ()):
            if made.op < i < upto:
                self._run(self.ops[i], memo, key, root)
        memo[key, upto] = root
        return root

    def _run(self, op: _Op, memo: dict, building: int | None, root: torch.Tensor | None) -> Any:
        def real(a: Any) -> Any:
            if not isinstance(a, _MetaRef):
                return a
            if a.key == building:
                return _view(root, a)
            if a.key not in self.created:
                raise ValueError("zerostep.zero.Init: an init op read a meta tensor built outside the block")
            return _view(self._storage(a.key, op.index, memo), a)

        args, kwargs = optree.tree_map(real, (op.args, op.kwargs), none_is_leaf=True)
        if "device" in kwargs:
            kwargs["device"] = torch.device("cpu")
        if op.rng is not None:
            torch.random.set_rng_state(op.rng)
        if op.generator is not None:
            op.generator.set_state(op.generator_state)
        return op.func(*args, **kwargs)


def _view(root: torch.Tensor, like: _MetaRef) -> torch.Tensor:
    """``like``'s view (size, strides, offset, dtype) of the real storage ``root`` covers."""
    out = torch.empty(0, dtype=like.dtype, device=root.device)
    return out.set_(root.untyped_storage(), like.offset, like.size, like.stride)


def _at(outputs: Any, position: tuple) -> torch.Tensor:
    for p in position:
        outputs = outputs[p]
    return outputs


def _tensors_in(tree: Any) -> Iterator[tuple[tuple, torch.Tensor]]:
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor):
            yield path, leaf


class _Recording(TorchDispatchMode):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.recorder
        rng = generator = generator_state = None
        if _is_random(func):
            generator = kwargs.get("generator")
            if generator is not None:
                generator_state = generator.get_state()
            else:
                rng = torch.random.get_rng_state()
            _advance(func, args, kwargs)
        out = func(*args, **kwargs)
        inputs = {_key(t) for _, t in _tensors_in((args, kwargs)) if t.is_meta}
        new = [(p, t) for p, t in _tensors_in(out) if t.is_meta and _key(t) not in inputs]
        writes = [t for t in _written_args(func, args, kwargs) if t.is_meta and _key(t) in rec.created]
        if new or writes:
            op = _Op(len(rec.ops), func, _refs(args), _refs(kwargs), rng, generator, generator_state)
            rec.ops.append(op)
            for path, t in new:
                if _key(t) not in rec.created:
                    rec.created[_key(t)] = _Created(op.index, path)
                    rec.tensors.append(t)
            for t in writes:
                rec.writes.setdefault(_key(t), []).append(op.index)
        return out


def _advance(func: Any, args: tuple, kwargs: dict) -> None:
    """Run a random op once on scratch CPU tensors of its arguments' shapes: the generator moves on as
    a normal construction's would."""

    def scratch(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.is_meta:
            return torch.empty_strided(a.size(), a.stride(), dtype=a.dtype, device="cpu")
        return a

    s_args, s_kwargs = optree.tree_map(scratch, (args, kwargs), none_is_leaf=True)
    if "device" in s_kwargs:
        s_kwargs["device"] = torch.device("cpu")
    func(*s_args, **s_kwargs)


class DeferredInit:
    """Context manager: modules built inside have meta parameters and buffers, recorded for
    ``materialize`` (``recorder_of(t)``)."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        self._device: Any = None
        self._mode: _Recording | None = None

    def __enter__(self) -> DeferredInit:
        self._device = torch.device("meta")
        self._device.__enter__()
        self._mode = _Recording(self.recorder)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self._device.__exit__(*exc)
        for key in self.recorder.created:
            _RECORDERS[key] = self.recorder


def recorder_of(t: torch.Tensor) -> Recorder | None:
    """The recorder of a meta tensor built under ``DeferredInit``, or None."""
    if not t.is_meta:
        return None
    recorder = _RECORDERS.get(_key(t))
    return recorder if recorder is not None and recorder.knows(t) else None


def forget(tensors: Iterable[torch.Tensor]) -> None:
    """Drop the recorders of ``tensors`` (a materialized model's former meta parameters): their records
    and meta storages go."""
    doomed = {id(r) for t in tensors if (r := recorder_of(t)) is not None}
    for key in [k for k, r in _RECORDERS.items() if id(r) in doomed]:
        del _RECORDERS[key]


def is_deferred(t: torch.Tensor) -> bool:
    return recorder_of(t) is not None


def materialize(t: torch.Tensor) -> torch.Tensor:
    """A recorded meta tensor's value (new CPU memory); ``t`` itself is returned when it is real."""
    if not t.is_meta:
        return t
    recorder = recorder_of(t)
    if recorder is None:
        raise ValueError(
            "a tensor on the meta device that zerostep.zero.Init did not record has no values to "
            "materialize; build the model inside zerostep.zero.Init(), or on a real device"
        )
    return recorder.materialize(t)


class MaterializingValues(Mapping):
    """name -> value, materializing recorded meta tensors when read (one at a time: nothing is kept)."""

    def __init__(self, values: Mapping[str, torch.Tensor]) -> None:
        self._values = values

    def __getitem__(self, name: str) -> torch.Tensor:
        return materialize(self._values[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def materialize_module_constants(module: torch.nn.Module, device: torch.device) -> None:
    """Give ``module``'s recorded meta buffers and frozen parameters their values on ``device``, in
    place (they enter the forward whole; trainable parameters stay meta until the engine shards them)."""
    done: dict[int, torch.Tensor] = {}  # id -> its replacement: a tied tensor stays tied
    for sub in module.modules():
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_meta:
                if id(b) not in done:
                    done[id(b)] = materialize(b).to(device)
                sub._buffers[name] = done[id(b)]
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_meta and not p.requires_grad:
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(materialize(p).to(device), requires_grad=False)
                sub._parameters[name] = done[id(p)]
