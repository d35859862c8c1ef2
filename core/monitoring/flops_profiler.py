"""DeepSpeed's FLOPs profiler over ``torch.utils.flop_counter.FlopCounterMode``.

Between ``start_profile`` and ``stop_profile`` every forward of the model runs under one
``FlopCounterMode``, whose module tracker attributes each counted op to the module running it and to all
of that module's parents (so a module's count includes its children's and the functional ops it calls
itself). The profiler keeps, per module:

- forward FLOPs: what the counter gained between the root module's forward pre- and post-hooks (ops run
  in the backward are attributed to the same module names by the tracker; taking the delta over the root's
  forward keeps the forward apart, as DeepSpeed's "fwd flops" are);
- MACs: FLOPs / 2. FlopCounterMode counts only multiply-accumulate ops (mm, addmm, bmm, convolution,
  scaled-dot-product attention...) at 2 FLOPs per MAC; elementwise ops, norms and softmax count zero
  (DeepSpeed's hand-written formulas count some of them);
- parameters (``ds_numel`` where stage 3 left a placeholder) and forward latency (``perf_counter``
  around each module's forward, the device synchronised on each side on CUDA, as DeepSpeed does).

``section(name)`` measures the FLOPs and latency of anything else the caller wraps (the engines wrap the
backward and the optimizer step: their FLOPs are counted by the same counter, not estimated as 2x the
forward). ``print_model_profile`` prints DeepSpeed's summary, aggregated and detailed sections.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PRECISION = 2
GLOBAL = "Global"  # FlopCounterMode's key for everything counted


@dataclass
class Section:
    """FLOPs and seconds of one wrapped phase (summed over its calls)."""

    flops: int = 0
    seconds: float = 0.0
    calls: int = 0


@dataclass(frozen=True)
class ModuleProfile:
    name: str  # FlopCounterMode's name: the root's class name, then attribute names ("GPT.blocks.0.attn")
    kind: str  # the module's class name
    depth: int
    flops: int  # forward FLOPs, children included
    macs: int
    params: int  # children included
    duration: float  # forward seconds (the children's sum for a container never called itself)


# --- number formatting (DeepSpeed's units: K M G T, m u for small values) ----------------------------


def number_to_string(num: float, units: str | None = None, precision: int = PRECISION) -> str:
    scales = {"T": 1e12, "G": 1e9, "M": 1e6, "K": 1e3, "": 1.0, "m": 1e-3, "u": 1e-6}
    if units is None:
        units = next((u for u, s in scales.items() if num >= s), "u")
        if num == 0:
            units = ""
    return f"{round(num / scales.get(units, 1.0), precision):g} {units}"


def flops_to_string(flops: float, units: str | None = None, precision: int = PRECISION) -> str:
    return f"{number_to_string(flops, units, precision)}FLOPS"


def macs_to_string(macs: float, units: str | None = None, precision: int = PRECISION) -> str:
    return f"{number_to_string(macs, units, precision)}MACs"


def params_to_string(params: float, units: str | None = None, precision: int = PRECISION) -> str:
    units = units.replace("B", "G") if units else units
    return number_to_string(params, units, precision).replace("G", "B").strip()


def duration_to_string(seconds: float, units: str | None = None, precision: int = PRECISION) -> str:
    return f"{number_to_string(seconds, units, precision)}s"


# --- the profiler -------------------------------------------------------------------------------------


def _param_count(module: nn.Module) -> int:
    # Stage 3 placeholders keep their full size in ds_numel (module_binding).
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


def _module_tree(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """(module, name, depth) in definition order, named as FlopCounterMode's module tracker names them."""
    out: list[tuple[nn.Module, str, int]] = []

    def walk(module: nn.Module, name: str, depth: int) -> None:
        out.append((module, name, depth))
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}", depth + 1)

    walk(model, type(model).__name__, 0)
    return out


class FlopsProfiler:
    """DeepSpeed's ``FlopsProfiler(model, ds_engine=None, recompute_fwd_factor=0.0)``:
    ``start_profile()``, run forwards, ``get_total_flops()``/``print_model_profile()``, ``end_profile()``.
    """

    def __init__(self, model: nn.Module, ds_engine: Any = None, recompute_fwd_factor: float = 0.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FlopsProfiler: model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.ds_engine = ds_engine
        self.recompute_fwd_factor = float(recompute_fwd_factor)
        self.started = False
        self._counter: FlopCounterMode | None = None
        self._handles: list[Any] = []
        self._sync = _synchronizer(model)
        self.reset_profile()

    # ------------------------------------------------------------------ lifecycle

    def start_profile(self, ignore_list: Sequence[type] | None = None) -> None:
        """Count and time every forward of the model from now on (modules whose type is in
        ``ignore_list`` are not timed; their FLOPs still count toward their parents)."""
        if self.started:
            return
        self.reset_profile()
        ignored = tuple(ignore_list or ())
        self._tree = _module_tree(self.model)
        self._params = {name: _param_count(m) for m, name, _ in self._tree}
        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()
        root = self.model
        self._handles.append(root.register_forward_pre_hook(self._root_pre, prepend=True))
        self._handles.append(root.register_forward_hook(self._root_post, always_call=True))
        for module, name, _ in self._tree:
            if ignored and isinstance(module, ignored):
                continue
            self._handles.append(module.register_forward_pre_hook(self._time_pre(name)))
            self._handles.append(module.register_forward_hook(self._time_post(name), always_call=True))
        self.started = True

    def stop_profile(self) -> None:
        """Stop counting; what was measured stays readable until ``end_profile``."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
        self._counter = None

    def reset_profile(self) -> None:
        self._fwd: dict[str, int] = defaultdict(int)  # module name -> forward FLOPs
        self._duration: dict[str, float] = defaultdict(float)
        self._open: dict[str, list[float]] = defaultdict(list)
        self._root_start: dict[str, int] | None = None
        self.sections: dict[str, Section] = {}
        self._tree: list[tuple[nn.Module, str, int]] = []
        self._params: dict[str, int] = {}

    def end_profile(self) -> None:
        """Stop and forget everything (DeepSpeed's ``end_profile``)."""
        self.stop_profile()
        self.reset_profile()
        self.started = False

    # ------------------------------------------------------------------ hooks

    def _snapshot(self) -> dict[str, int]:
        assert self._counter is not None
        return {name: sum(ops.values()) for name, ops in self._counter.flop_counts.items()}

    def _root_pre(self, module: nn.Module, args: Any) -> None:
        if self._counter is not None and self._root_start is None:
            self._root_start = self._snapshot()

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._counter is None or self._root_start is None:
            return
        before, self._root_start = self._root_start, None
        # The tracker names a module after the first module it saw around it: the root is "Net" when the
        # profile starts inside an outer module's forward, "DeepSpeedEngine.module" on later calls. Its
        # names are mapped back to the root's class name so every forward adds into the same rows.
        known = getattr(self._counter.mod_tracker, "_known_modules", {})
        tracked = known.get(module, type(module).__name__)
        root = type(module).__name__
        for name, flops in self._snapshot().items():
            gained = flops - before.get(name, 0)
            if name == tracked:
                name = root
            elif name.startswith(tracked + "."):
                name = root + name[len(tracked) :]
            elif name != GLOBAL:
                continue  # an outer module's row: not part of this model
            if gained:
                self._fwd[name] += gained

    def _time_pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._sync()
            self._open[name].append(time.perf_counter())

        return hook

    def _time_post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._open[name]:
                self._sync()
                self._duration[name] += time.perf_counter() - self._open[name].pop()

        return hook

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """FLOPs (all counted ops) and seconds of the wrapped code, summed into ``sections[name]``."""
        if self._counter is None:
            yield
            return
        before = self._snapshot().get(GLOBAL, 0)
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            seconds = time.perf_counter() - start
            after = self._snapshot().get(GLOBAL, 0) if self._counter is not None else before
            entry = self.sections.setdefault(name, Section())
            entry.flops += after - before
            entry.seconds += seconds
            entry.calls += 1

    # ------------------------------------------------------------------ results

    def module_profiles(self) -> list[ModuleProfile]:
        """Every module of the model in definition order (a container never called itself, e.g. a
        ModuleList, gets its children's sums)."""
        tree = self._tree or _module_tree(self.model)
        children: dict[str, list[str]] = defaultdict(list)
        for _, name, _ in tree:
            parent = name.rpartition(".")[0]
            if parent:
                children[parent].append(name)

        def flops(name: str) -> int:
            if name in self._fwd:
                return self._fwd[name]
            return sum(flops(c) for c in children[name])

        def duration(name: str) -> float:
            if self._duration.get(name):
                return self._duration[name]
            return sum(duration(c) for c in children[name])

        params = self._params or {name: _param_count(m) for m, name, _ in tree}
        return [
            ModuleProfile(
                name, type(m).__name__, depth, flops(name), flops(name) // 2, params[name], duration(name)
            )
            for m, name, depth in tree
        ]

    def _root(self) -> ModuleProfile:
        return self.module_profiles()[0]

    def get_total_flops(self, as_string: bool = False) -> int | str:
        """Forward FLOPs of the model over every forward since ``start_profile``."""
        total = self._root().flops
        return number_to_string(total) if as_string else total

    def get_total_macs(self, as_string: bool = False) -> int | str:
        total = self._root().macs
        return macs_to_string(total) if as_string else total

    def get_total_duration(self, as_string: bool = False) -> float | str:
        """Forward seconds of the model (the root module's hooks)."""
        total = self._root().duration
        return duration_to_string(total) if as_string else total

    def get_total_params(self, as_string: bool = False) -> int | str:
        total = self._root().params
        return params_to_string(total) if as_string else total

    # ------------------------------------------------------------------ printing

    def print_model_profile(
        self,
        profile_step: int = 1,
        module_depth: int = -1,
        top_modules: int = 1,
        detailed: bool = True,
        output_file: str | None = None,
    ) -> None:
        """DeepSpeed's profile printout, to stdout or ``output_file`` (its directory is created)."""
        if not self.started:
            return
        emit_profile(self.profile_text(profile_step, module_depth, top_modules, detailed), output_file)

    def profile_text(
        self, profile_step: int = 1, module_depth: int = -1, top_modules: int = 1, detailed: bool = True
    ) -> str:
        profiles = self.module_profiles()
        lines = self._summary(profile_step, profiles[0])
        lines += [
            "",
            "----------------------------- Aggregated Profile per GPU -----------------------------",
        ]
        lines += aggregated_lines(profiles, module_depth, top_modules)
        if detailed:
            lines += [
                "",
                "------------------------------ Detailed Profile per GPU ------------------------------",
            ]
            lines += DETAILED_NOTES
            lines += detailed_lines(self.model, profiles)
        lines.append("------------------------------------------------------------------------------")
        return "\n".join(lines) + "\n"

    def _summary(self, profile_step: int, root: ModuleProfile) -> list[str]:
        row = "{:<70}  {:<8}".format
        engine = self.ds_engine
        lines = [
            "",
            "-------------------------- DeepSpeed Flops Profiler --------------------------",
            f"Profile Summary at step {profile_step}:",
            *NOTATIONS,
        ]
        if engine is not None:
            lines += [
                row("world size: ", engine.world_size),
                row("data parallel size: ", engine.dp_world_size),
                row("model parallel size: ", 1),
                row("batch size per GPU: ", engine.train_micro_batch_size_per_gpu()),
            ]
        flops = root.flops
        lines += [
            row("params per GPU: ", params_to_string(root.params)),
            row("params of model = params per GPU * mp_size: ", params_to_string(root.params)),
            row("fwd MACs per GPU: ", macs_to_string(root.macs)),
            row("fwd flops per GPU: ", number_to_string(flops)),
            row("fwd flops of model = fwd flops per GPU * mp_size: ", number_to_string(flops)),
        ]
        fwd = self.sections.get("forward")
        fwd_latency = fwd.seconds if fwd is not None else root.duration
        lines += [
            row("fwd latency: ", duration_to_string(fwd_latency)),
            row("fwd FLOPS per GPU = fwd flops per GPU / fwd latency: ", _rate(flops, fwd_latency)),
        ]
        bwd, step = self.sections.get("backward"), self.sections.get("step")
        if bwd is not None:
            # Measured by the counter (recomputed forwards included), not DeepSpeed's 2x estimate.
            lines += [
                row("bwd latency: ", duration_to_string(bwd.seconds)),
                row("bwd flops per GPU (counted): ", number_to_string(bwd.flops)),
                row("bwd FLOPS per GPU = bwd flops per GPU / bwd latency: ", _rate(bwd.flops, bwd.seconds)),
                row(
                    "fwd+bwd FLOPS per GPU = (fwd+bwd flops) / (fwd+bwd latency): ",
                    _rate(flops + bwd.flops, fwd_latency + bwd.seconds),
                ),
            ]
        if step is not None:
            lines.append(row("step latency: ", duration_to_string(step.seconds)))
        if bwd is not None and step is not None:
            iter_latency = fwd_latency + bwd.seconds + step.seconds
            total = flops + bwd.flops + step.flops
            lines += [
                row("iter latency: ", duration_to_string(iter_latency)),
                row("FLOPS per GPU = (fwd+bwd+step flops) / iter latency: ", _rate(total, iter_latency)),
            ]
            if engine is not None and iter_latency > 0:
                samples = engine.train_micro_batch_size_per_gpu() * engine.world_size
                samples *= max(1, fwd.calls if fwd is not None else 1)
                lines.append(row("samples/second: ", round(samples / iter_latency, PRECISION)))
        return lines


def emit_profile(text: str, output_file: str | None) -> None:
    """To ``output_file`` (its directory created) or stdout."""
    if output_file:
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        with open(output_file, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


NOTATIONS = [
    "Notations:",
    "data parallel size (dp_size), model parallel size(mp_size),",
    "number of parameters (params), number of multiply-accumulate operations(MACs),",
    "number of floating-point operations (flops), floating-point operations per second (FLOPS),",
    "fwd latency (forward propagation latency), bwd latency (backward propagation latency),",
    "step (weights update latency), iter latency (sum of fwd, bwd and step latency)",
    "",
]

DETAILED_NOTES = [
    "Each module profile is listed after its name in the following order: ",
    "params, percentage of total params, MACs, percentage of total MACs, fwd latency, percentage of total "
    "fwd latency, fwd FLOPS",
    "",
    "Note: 1. A module's counts include its submodules' and the torch.nn.functional ops it calls itself, so "
    "a parent's MACs (or latency) can exceed the sum of its submodules'.",
    "2. FLOPs are torch.utils.flop_counter's counts of multiply-accumulate ops (matmuls, convolutions, "
    "attention); elementwise ops count zero. MACs = FLOPs / 2.",
    "3. The fwd latency of the top module is captured at its forward hooks, so it is less than the fwd "
    "latency above when the engine's forward does more than call the module.",
    "",
]


def _rate(flops: float, seconds: float) -> str:
    return flops_to_string(flops / seconds if seconds > 0 else 0.0)


def _percent(part: float, whole: float) -> str:
    return f"{round(100 * part / whole, PRECISION) if whole else 0:g}%"


def aggregated_lines(profiles: list[ModuleProfile], module_depth: int, top_modules: int) -> list[str]:
    """Per depth, the ``top_modules`` module classes by params, MACs and latency (summed per class)."""
    by_depth: dict[int, dict[str, list[float]]] = defaultdict(dict)
    for p in profiles:
        entry = by_depth[p.depth].setdefault(p.kind, [0, 0, 0.0])
        entry[0] += p.macs
        entry[1] += p.params
        entry[2] += p.duration
    deepest = max(by_depth)
    last = deepest if module_depth < 0 else min(module_depth, deepest)
    lines = [f"Top {top_modules} modules in terms of params, MACs or fwd latency at different model depths:"]
    for depth in range(last + 1):
        rows = by_depth[depth]

        def top(index: int, fmt: Callable[[float], str], rows: dict[str, list[float]] = rows) -> dict:
            ranked = sorted(rows.items(), key=lambda item: item[1][index], reverse=True)[:top_modules]
            return {name: fmt(v[index]) for name, v in ranked}

        lines += [
            f"depth {depth}:",
            f"    params      - {top(1, params_to_string)}",
            f"    MACs        - {top(0, macs_to_string)}",
            f"    fwd latency - {top(2, duration_to_string)}",
        ]
    return lines


def detailed_lines(model: nn.Module, profiles: list[ModuleProfile]) -> list[str]:
    """The model printed as torch prints it, each module's profile first in its parentheses."""
    root = profiles[0]
    stats = {p.name: p for p in profiles}

    def describe(p: ModuleProfile) -> str:
        return ", ".join(
            [
                f"{params_to_string(p.params)} = {_percent(p.params, root.params)} Params",
                f"{macs_to_string(p.macs)} = {_percent(p.macs, root.macs)} MACs",
                f"{duration_to_string(p.duration)} = {_percent(p.duration, root.duration)} latency",
                _rate(p.flops, p.duration),
            ]
        )

    lines: list[str] = []

    def walk(module: nn.Module, name: str, label: str, indent: str) -> None:
        extra = module.extra_repr()
        head = f"{indent}{label}{type(module).__name__}("
        body = describe(stats[name]) + (f", {extra}" if extra else "")
        children = list(module.named_children())
        if not children:
            lines.append(f"{head}{body})")
            return
        lines.append(head)
        lines.append(f"{indent}  {body}")
        for child_name, child in children:
            walk(child, f"{name}.{child_name}", f"({child_name}): ", indent + "  ")
        lines.append(f"{indent})")

    walk(model, root.name, "", "")
    return lines


def _synchronizer(model: nn.Module) -> Callable[[], None]:
    """Wait for the device before reading the clock (CUDA runs asynchronously); nothing on CPU."""
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if any(d.type == "cuda" for d in devices):
        return torch.cuda.synchronize
    return lambda: None


# --- one-call profile ---------------------------------------------------------------------------------


def get_model_profile(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    args: Sequence[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    print_profile: bool = True,
    detailed: bool = True,
    module_depth: int = -1,
    top_modules: int = 1,
    warm_up: int = 1,
    as_string: bool = True,
    output_file: str | None = None,
    ignore_modules: Sequence[type] | None = None,
    mode: str = "forward",
) -> tuple[Any, Any, Any]:
    """DeepSpeed's ``get_model_profile``: ``warm_up`` forwards, then one profiled forward (``mode``
    "forward" or "generate"); returns (flops, macs, params), as strings when ``as_string``. The model runs
    in eval mode, restored afterwards."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_model_profile: model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in ("forward", "generate"):
        raise ValueError(f'get_model_profile: mode must be "forward" or "generate", got {mode!r}')
    args, kwargs = list(args or ()), dict(kwargs or {})
    if input_shape is not None:
        if not isinstance(input_shape, tuple) or not input_shape:
            raise ValueError(f"get_model_profile: input_shape must be a non-empty tuple, got {input_shape!r}")
        first = next(iter(model.parameters()), None)
        like = first if first is not None else torch.empty(())
        args = [torch.ones(input_shape, dtype=like.dtype, device=like.device)]
    if not args and not kwargs:
        raise ValueError("get_model_profile: give input_shape, or args and/or kwargs for the model")
    call = model if mode == "forward" else model.generate
    was_training = model.training
    model.eval()
    try:
        for _ in range(warm_up):
            call(*args, **kwargs)
        prof = FlopsProfiler(model)
        prof.start_profile(ignore_list=ignore_modules)
        try:
            call(*args, **kwargs)
            flops, macs, params = prof.get_total_flops(), prof.get_total_macs(), prof.get_total_params()
            if print_profile:
                prof.print_model_profile(warm_up, module_depth, top_modules, detailed, output_file)
        finally:
            prof.end_profile()
    finally:
        model.train(was_training)
    if as_string:
        return number_to_string(flops), macs_to_string(macs), params_to_string(params)
    return flops, macs, params
