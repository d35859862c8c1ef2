"""Activation checkpointing: run a function without keeping its activations, recompute them in backward.

Built on ``torch.utils.checkpoint`` without reentrancy (``use_reentrant=False``), which works under
``torch.compile`` (dynamo turns it into a recompute region of the compiled forward+backward) and in an
eager backward with hooks, and which restores the CPU and device RNG states before recomputing, so
dropout draws the same mask twice.

Two ways in:

- ``checkpoint(function, *args, settings=...)``: what ``zerostep.checkpointing.checkpoint`` (DeepSpeed's
  ``deepspeed.checkpointing.checkpoint``) calls;
- ``install_unit_checkpointing(model, settings)``: every ZeRO unit (``parallel.zero3.unit_module_paths``:
  the children of the outermost ``ModuleList``/``Sequential``) gets a checkpointed ``forward``, so each
  path of the engine (compiled step, eager overlap/stage-2 backward, stage 3's gather/free, the facade)
  checkpoints the same blocks without knowing it.

Why parameters are captured. The engine runs the model on tensors that are not the module's own
parameters (``torch.func.functional_call`` on views of the flat buffers; stage 3 swaps views of a gathered
buffer into ``_parameters`` only during the unit's forward). In an eager backward those swaps are undone
by the time the recomputation runs, so a module's checkpointed forward records, at forward time, the
tensors its ``_parameters``/``_buffers`` hold and puts them back around the recomputation. At stage 3 they
are views of the unit's gathered buffer: the gradient hook ``parallel.zero3`` puts on the unit's outputs
refills that storage before the unit's backward, i.e. before the recomputation reads it. Inside
``torch.compile`` none of this is needed (the recomputation is part of the compiled graph), and the host-
side options (``cpu_checkpointing``, ``synchronize_checkpoint_boundary``, ``profile``) do not apply there.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from zerostep.core.config.memory import ActivationCheckpointingConfig

logger = logging.getLogger("zerostep.checkpointing")

Location = tuple[dict[str, Any], str]  # (a module's _parameters or _buffers, attribute name)


@dataclass
class ProfileTotals:
    """What ``profile`` measured so far: checkpointed calls, their forward and recomputation seconds."""

    calls: int = 0
    forward_s: float = 0.0
    recomputations: int = 0
    recompute_s: float = 0.0
    last: dict[str, float] = field(default_factory=dict)


PROFILE = ProfileTotals()


def _tensor_device(args: tuple[Any, ...]) -> torch.device | None:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
    return None


def _synchronize(device: torch.device | None) -> None:
    # CPU kernels finish before they return; only accelerator streams need waiting for.
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(
    function: Callable[..., Any], settings: ActivationCheckpointingConfig, device: torch.device | None
) -> Callable[..., Any]:
    """``function`` with the boundary synchronization and profiling the settings ask for; the wrapped
    function runs once in forward and once more in backward (the recomputation)."""
    if not (settings.synchronize_checkpoint_boundary or settings.profile):
        return function
    first = [True]

    def run(*args: Any, **kwargs: Any) -> Any:
        # the recomputation stops (raises inside torch's checkpoint) once backward has what it needs, so
        # the boundary work happens in a finally
        forward, first[0] = first[0], False
        _synchronize(device)
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _synchronize(device)
            if settings.profile:
                _record(forward, time.perf_counter() - start)

    return run


def _record(forward: bool, seconds: float) -> None:
    if forward:
        PROFILE.calls += 1
        PROFILE.forward_s += seconds
    else:
        PROFILE.recomputations += 1
        PROFILE.recompute_s += seconds
    kind = "forward" if forward else "recompute"
    PROFILE.last[kind] = seconds
    logger.info("activation checkpoint %s: %.3f ms", kind, seconds * 1e3)


def _replaying_tracker(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` whose recomputation starts from the RNG tracker's states of the forward (torch's
    checkpoint restores the default generators only), leaving the tracker as backward found it."""
    if not RNG_TRACKER.states:
        return function
    at_forward: list[dict[str, torch.Tensor]] = []

    def run(*args: Any, **kwargs: Any) -> Any:
        if not at_forward:
            at_forward.append(RNG_TRACKER.get_states())
            return function(*args, **kwargs)
        now = RNG_TRACKER.get_states()
        RNG_TRACKER.set_states(dict(at_forward[0]))
        try:
            return function(*args, **kwargs)
        finally:
            RNG_TRACKER.set_states(now)

    return run


def _cpu_saving(settings: ActivationCheckpointingConfig, device: torch.device | None):
    """Where the checkpoint's saved inputs go: host memory with ``cpu_checkpointing`` (pinned when they
    come from a GPU, so the copies back can overlap), else where they are."""
    if not settings.cpu_checkpointing:
        return contextlib.nullcontext()
    pin = device is not None and device.type == "cuda"
    return torch.autograd.graph.save_on_cpu(pin_memory=pin)


def checkpoint(
    function: Callable[..., Any],
    *args: Any,
    settings: ActivationCheckpointingConfig | None = None,
    **kwargs: Any,
) -> Any:
    """``function(*args, **kwargs)``, keeping only its inputs for backward and recomputing the rest there.

    An ``nn.Module`` (or a module's bound ``forward``) is run with the tensors its parameters and buffers
    hold now put back around the recomputation (see the module docstring); another function reads
    whatever modules it closes over when backward recomputes it. Without grad mode it is a plain call."""
    settings = settings or ActivationCheckpointingConfig()
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    if torch.compiler.is_compiling():
        return torch_checkpoint(function, *args, use_reentrant=False, **kwargs)
    module = function if isinstance(function, nn.Module) else getattr(function, "__self__", None)
    if isinstance(module, nn.Module):
        if isinstance(function, nn.Module):
            # its hooks (stage 3's gather/free) run once, around the checkpointed region
            with _checkpointed_forward(function, settings):
                return function(*args, **kwargs)
        return _run_module_forward(module, function, args, kwargs, settings)
    device = _tensor_device(args)
    run = _replaying_tracker(_timed(function, settings, device))
    with _cpu_saving(settings, device):
        return torch_checkpoint(run, *args, use_reentrant=False, **kwargs)


def _locations(module: nn.Module) -> list[tuple[Location, Any]]:
    """Every (dict, name) slot holding one of ``module``'s parameters or buffers, with what it holds."""
    out = []
    for sub in module.modules():
        for slots in (sub._parameters, sub._buffers):
            out += [((slots, name), value) for name, value in slots.items() if value is not None]
    return out


@contextlib.contextmanager
def _holding(captured: list[tuple[Location, Any]]) -> Iterator[None]:
    saved = [(slots, name, slots.get(name)) for (slots, name), _ in captured]
    try:
        for (slots, name), value in captured:
            slots[name] = value
        yield
    finally:
        for slots, name, value in reversed(saved):
            slots[name] = value


def _run_module_forward(
    module: nn.Module,
    forward: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    settings: ActivationCheckpointingConfig,
) -> Any:
    captured = _locations(module)  # the tensors this call sees (functional_call's, stage 3's views)
    device = _tensor_device(args)
    timed = _replaying_tracker(_timed(forward, settings, device))

    def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
        with _holding(captured):
            return timed(*inner_args, **inner_kwargs)

    # the captured tensors stay referenced by this closure, never copied (by cpu_checkpointing either):
    # they are parameters, not activations
    with _cpu_saving(settings, device):
        return torch_checkpoint(run, *args, use_reentrant=False, **kwargs)


class CheckpointedForward:
    """A module's ``forward`` replaced by a checkpointed call of the original one (an instance attribute,
    so ``module(x)`` still runs the module's hooks once, outside the checkpointed region)."""

    def __init__(self, module: nn.Module, settings: ActivationCheckpointingConfig) -> None:
        self.module = module
        self.inner = module.forward  # the forward in place before (a bound method, or an instance one)
        self.settings = settings

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        if torch.compiler.is_compiling():
            return torch_checkpoint(self.inner, *args, use_reentrant=False, **kwargs)
        return _run_module_forward(self.module, self.inner, args, kwargs, self.settings)


@contextlib.contextmanager
def _checkpointed_forward(module: nn.Module, settings: ActivationCheckpointingConfig) -> Iterator[None]:
    if isinstance(module.__dict__.get("forward"), CheckpointedForward):
        yield  # already checkpointed (checkpoint_units): once is enough
        return
    before = module.__dict__.get("forward")
    module.forward = CheckpointedForward(module, settings)
    try:
        yield
    finally:
        if before is None:
            del module.forward
        else:
            module.forward = before


def install_unit_checkpointing(
    model: nn.Module, settings: ActivationCheckpointingConfig, paths: list[str]
) -> list[str]:
    """Checkpoint the forward of each module at ``paths`` (module paths in ``model``); returns the paths
    newly wrapped. Idempotent: a module already wrapped gets the new settings."""
    wrapped = []
    for path in paths:
        module = model.get_submodule(path)
        current = module.__dict__.get("forward")
        if isinstance(current, CheckpointedForward):
            current.settings = settings
            continue
        module.forward = CheckpointedForward(module, settings)
        wrapped.append(path)
    return wrapped


def remove_unit_checkpointing(model: nn.Module) -> list[str]:
    """Undo ``install_unit_checkpointing`` everywhere in ``model``; returns the paths unwrapped."""
    removed = []
    for path, module in model.named_modules():
        current = module.__dict__.get("forward")
        if isinstance(current, CheckpointedForward):
            if current.inner == type(module).forward.__get__(module):
                del module.forward
            else:
                module.forward = current.inner
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------------
# named RNG streams (Megatron's model-parallel dropout), replayed by the recomputation


def _device_generator() -> torch.Generator:
    if torch.cuda.is_available():
        return torch.cuda.default_generators[torch.cuda.current_device()]
    return torch.default_generator


class RNGStatesTracker:
    """Named generator states of the current device (the GPU's, else the CPU's): ``add(name, seed)``,
    then ``with fork(name):`` draws from that stream and leaves the default one untouched."""

    def __init__(self) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.seeds: set[int] = set()

    def reset(self) -> None:
        self.states, self.seeds = {}, set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds:
            raise ValueError(f"RNG tracker: seed {seed} is already used by another stream")
        if name in self.states:
            raise ValueError(f"RNG tracker: a stream named {name!r} already exists")
        gen = _device_generator()
        before = gen.get_state()
        gen.manual_seed(seed)
        self.states[name] = gen.get_state()
        gen.set_state(before)
        self.seeds.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states:
            raise ValueError(f"RNG tracker: no stream named {name!r} (add it first)")
        gen = _device_generator()
        before = gen.get_state()
        gen.set_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = gen.get_state()
            gen.set_state(before)


RNG_TRACKER = RNGStatesTracker()


# ----------------------------------------------------------------------------------------------
# measuring


class SavedTensorBytes:
    """Bytes autograd keeps for backward while the context is open (unique storages, each counted once),
    leaving out the storages of ``exclude`` (e.g. the parameters, which are kept anyway). Inside a
    checkpointed region only its inputs are counted: the region's own saved tensors never reach these
    hooks (the checkpoint's hooks are the innermost)."""

    def __init__(self, exclude: list[torch.Tensor] | tuple[torch.Tensor, ...] = ()) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._seen: dict[tuple[str, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._excluded:
            self._seen.setdefault(key, tensor.untyped_storage().nbytes())
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


# ----------------------------------------------------------------------------------------------
# the process-wide settings of zerostep.checkpointing (DeepSpeed keeps them in module globals too)


@dataclass
class _Configured:
    settings: ActivationCheckpointingConfig | None = None  # None: configure() not called yet
    model_parallel_size: int = 1
    mpu: Any = None


CONFIGURED = _Configured()


def configured_settings() -> ActivationCheckpointingConfig:
    """What ``zerostep.checkpointing.checkpoint`` applies: the configured settings, else the defaults."""
    return CONFIGURED.settings or ActivationCheckpointingConfig()


def adopt_config(settings: ActivationCheckpointingConfig) -> bool:
    """An engine's ``activation_checkpointing`` block becomes the process's settings unless the script
    configured them itself (``zerostep.checkpointing.configure``); returns whether it did."""
    if CONFIGURED.settings is not None:
        return False
    CONFIGURED.settings = settings
    return True


def eager_only_options(settings: ActivationCheckpointingConfig) -> list[str]:
    """The options a compiled forward+backward does not apply (host-side work around each region)."""
    names = ("cpu_checkpointing", "synchronize_checkpoint_boundary", "profile")
    return [name for name in names if getattr(settings, name)]
