"""``PipelineModule``, ``LayerSpec``, ``TiedLayerSpec``: DeepSpeed's pipeline model description.

A pipeline model is a list of layers run one after the other (each layer's output is the next one's
input). ``PipelineModule`` partitions the list into stages (``parallel.pipeline.partition``) and builds,
on each rank, only the layers of the stage(s) that rank runs: a ``LayerSpec`` is constructed there and
nowhere else (``partition_method="parameters"`` sizes the others on the meta device, without
allocating). Owned layers are registered under their global index (``"3.weight"``) and tied modules
under ``"tied_modules.<key>"``, so a parameter has the same name at every stage count: checkpoints move
between pipeline layouts by name.

A ``TiedLayerSpec`` builds one module per rank for its ``key`` wherever a stage uses it (e.g. the
embedding on the first stage and the LM head on the last); the copies start from the lowest stage's
values (broadcast at construction) and the engine sums their gradients over the stages holding them.
Unlike DeepSpeed, which ties only ``tied_weight_attr``, every parameter of the tied module is tied, so
pipelining never changes what a model computes (at one stage the module is one module).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zerostep.parallel import pipeline as pp
from zerostep.parallel.groups import device_for_backend


class LayerSpec:
    """A layer to build later, on the stage that owns it: ``typename(*module_args, **module_kwargs)``."""

    def __init__(self, typename: type, *module_args: Any, **module_kwargs: Any) -> None:
        if not (isinstance(typename, type) and issubclass(typename, nn.Module)):
            raise TypeError(f"LayerSpec needs a torch.nn.Module subclass, got {typename!r}")
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def build(self, log: bool = False) -> nn.Module:
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self) -> str:
        args = [repr(a) for a in self.module_args] + [f"{k}={v!r}" for k, v in self.module_kwargs.items()]
        return f"{self.typename.__name__}({', '.join(args)})"


class TiedLayerSpec(LayerSpec):
    """A layer whose module is shared by every layer of the same ``key``; ``forward_fn(module, x)``
    replaces ``module(x)`` where given (e.g. an embedding reused as the output projection)."""

    def __init__(
        self,
        key: str,
        typename: type,
        *module_args: Any,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        tied_weight_attr: str | list[str] = "weight",
        **module_kwargs: Any,
    ) -> None:
        super().__init__(typename, *module_args, **module_kwargs)
        if not isinstance(key, str) or not key:
            raise ValueError(f"TiedLayerSpec key must be a non-empty string, got {key!r}")
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attr = (
            [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)
        )


def _type_name(layer: Any) -> str | None:
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", None)


def _count_params(layer: Any) -> int:
    """Trainable parameters of a layer; a ``LayerSpec`` is built on the meta device to count them (no
    memory, no random numbers drawn), or for real in a forked RNG if its constructor refuses meta."""
    if isinstance(layer, nn.Module):
        return sum(p.numel() for p in layer.parameters() if p.requires_grad)
    if not isinstance(layer, LayerSpec):
        return 0
    try:
        with torch.device("meta"):
            module = layer.build()
    except Exception:
        with torch.random.fork_rng(devices=[]):
            module = layer.build()
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class StageChunk(nn.Module):
    """The layers ``start:stop`` of a ``PipelineModule``, as one module: what a
    ``torch.distributed.pipelining.PipelineStage`` runs. Its parameters are exactly those layers'
    (a schedule's weight-gradient pass goes over ``parameters()``)."""

    def __init__(self, owner: PipelineModule, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        modules: dict[int, nn.Module] = {}
        for f in owner.funcs_of(start, stop):
            # a tied layer with a forward_fn is a partial over its module: that module's too
            module = f.args[0] if isinstance(f, functools.partial) and f.args else f
            if isinstance(module, nn.Module):
                modules.setdefault(id(module), module)
        self.layers = nn.ModuleList(modules.values())
        self._owner_forward = functools.partial(owner.run_layers, start, stop)

    def forward(self, *inputs: Any) -> Any:
        return self._owner_forward(inputs[0] if len(inputs) == 1 else inputs)


class PipelineModule(nn.Module):
    """DeepSpeed's ``PipelineModule``: ``layers`` split into ``num_stages`` stages (or the ``pipe`` axis
    of ``topology``), ``loss_fn(outputs, labels)`` on the last stage.

    ``partition_method``: ``"parameters"`` (default), ``"uniform"`` or ``"type:<regex>"``.
    ``seed_layers``: seed torch's RNG with ``base_seed + layer index`` before building each layer (and
    per micro-batch and layer in forward, as DeepSpeed), so a layer's initial values do not depend on
    the stage count. ``activation_checkpoint_interval``: checkpoint every run of that many layers that
    holds parameters. ``stages_per_rank`` (zerostep's): how many pipeline stages each rank runs (2 or
    more for interleaved and V-shaped schedules); the layers are then partitioned into
    ``num_stages * stages_per_rank`` stages."""

    def __init__(
        self,
        layers: Iterable[Any],
        num_stages: int | None = None,
        topology: pp.ProcessTopology | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        seed_layers: bool = False,
        seed_fn: Callable[[int], Any] | None = None,
        base_seed: int = 1234,
        partition_method: str = "parameters",
        activation_checkpoint_interval: int = 0,
        activation_checkpoint_func: Callable[..., Any] | None = None,
        checkpointable_layers: list[str] | None = None,
        *,
        stages_per_rank: int = 1,
        virtual_style: str = "loop",
    ) -> None:
        super().__init__()
        if num_stages is None and topology is None:
            raise ValueError("PipelineModule needs num_stages or topology")
        initialized = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialized else 1
        if topology is None:
            topology = pp.default_topology(int(num_stages), world)
        elif num_stages is not None and int(num_stages) != topology.get_dim(pp.PIPE_AXIS):
            raise ValueError(
                f"num_stages={num_stages} but the topology has {topology.get_dim(pp.PIPE_AXIS)} pipe stages"
            )
        pp.check_topology(topology, world)
        self._layer_specs = list(layers)
        if not self._layer_specs:
            raise ValueError("PipelineModule needs at least one layer")
        self.num_stages = topology.get_dim(pp.PIPE_AXIS)
        self.stages_per_rank = int(stages_per_rank)
        if self.stages_per_rank < 1:
            raise ValueError(f"stages_per_rank must be >= 1, got {stages_per_rank}")
        total_stages = self.num_stages * self.stages_per_rank
        if total_stages > len(self._layer_specs):
            raise ValueError(
                f"{total_stages} pipeline stages but only {len(self._layer_specs)} layers: every stage "
                "needs at least one layer"
            )
        if int(activation_checkpoint_interval) < 0:
            raise ValueError(
                f"activation_checkpoint_interval must be >= 0, got {activation_checkpoint_interval}"
            )
        if checkpointable_layers is not None and not isinstance(checkpointable_layers, list):
            raise TypeError("checkpointable_layers must be a list of layer class names")
        self.loss_fn = loss_fn
        self.seed_layers, self.seed_fn, self.base_seed = bool(seed_layers), seed_fn, int(base_seed)
        self.partition_method = partition_method
        self.activation_checkpoint_interval = int(activation_checkpoint_interval)
        self.activation_checkpoint_func = activation_checkpoint_func
        self.checkpointable_layers = checkpointable_layers
        self.micro_offset = 0
        self._topo = topology
        self.mesh = pp.build_mesh(topology)
        self.stage_id = self.mesh.stage_id
        counts = (
            [_count_params(layer) for layer in self._layer_specs] if _needs_counts(partition_method) else None
        )
        self.parts = pp.partition(
            partition_method,
            counts or [0] * len(self._layer_specs),
            [_type_name(layer) for layer in self._layer_specs],
            total_stages,
        )
        empty = [s for s in range(total_stages) if self.parts[s] == self.parts[s + 1]]
        if empty:
            raise ValueError(
                f"partition_method {partition_method!r} leaves pipeline stage(s) {empty} without layers "
                f"(parts {self.parts}); use another method or fewer stages"
            )
        if virtual_style not in ("loop", "v"):
            raise ValueError(f"virtual_style must be 'loop' or 'v', got {virtual_style!r}")
        self.virtual_style = virtual_style
        self.virtual_stages = pp.virtual_stage_indices(
            self.stage_id, self.num_stages, self.stages_per_rank, virtual_style
        )
        self.tied_modules = nn.ModuleDict()
        self.tied_weight_attrs: dict[str, list[str]] = {}
        self._funcs: dict[int, Any] = {}  # global layer index -> callable, owned layers only
        self._build()
        self.to(device_for_backend())  # this rank's device, as DeepSpeed does (NCCL broadcasts below)
        self.mesh.add_tie_groups(self._tied_stages())
        self._synchronize_tied_weights()

    # ------------------------------------------------------------------ building

    def _owned_ranges(self) -> list[tuple[int, int]]:
        return [(self.parts[v], self.parts[v + 1]) for v in self.virtual_stages]

    def _build(self) -> None:
        for start, stop in self._owned_ranges():
            for idx in range(start, stop):
                layer = self._layer_specs[idx]
                if self.seed_layers:
                    self._seed(self.base_seed + idx)
                if isinstance(layer, PipelineModule):
                    raise NotImplementedError("a PipelineModule inside a PipelineModule is not supported")
                if isinstance(layer, TiedLayerSpec):
                    if layer.key not in self.tied_modules:
                        self.tied_modules[layer.key] = layer.build()
                        self.tied_weight_attrs[layer.key] = layer.tied_weight_attr
                        self._check_tied_attrs(layer.key, layer.tied_weight_attr)
                    module = self.tied_modules[layer.key]
                    self._funcs[idx] = (
                        module if layer.forward_fn is None else functools.partial(layer.forward_fn, module)
                    )
                elif isinstance(layer, LayerSpec):
                    module = layer.build()
                    self.add_module(str(idx), module)
                    self._funcs[idx] = module
                elif isinstance(layer, nn.Module):
                    self.add_module(str(idx), layer)
                    self._funcs[idx] = layer
                elif callable(layer):
                    self._funcs[idx] = layer
                else:
                    raise TypeError(
                        f"layer {idx} is a {type(layer).__name__}: layers must be modules, specs or callables"
                    )

    def _check_tied_attrs(self, key: str, attrs: list[str]) -> None:
        module = self.tied_modules[key]
        for attr in attrs:
            try:
                functools.reduce(getattr, attr.split("."), module)
            except AttributeError:
                raise ValueError(
                    f"TiedLayerSpec {key!r}: tied_weight_attr {attr!r} is not an attribute of its module"
                ) from None
        named = [n for n, _ in module.named_parameters()]
        if sorted(named) != sorted(attrs):
            warnings.warn(
                f"TiedLayerSpec {key!r}: tied_weight_attr={attrs} names some of its parameters "
                f"({named}); zerostep ties every parameter of a tied module across stages",
                stacklevel=4,
            )

    def _seed(self, seed: int) -> None:
        if self.seed_fn is not None:
            self.seed_fn(seed)
        else:
            torch.manual_seed(seed)

    def _tied_stages(self) -> dict[str, list[int]]:
        """Tied key -> the ranks' stage coordinates (pipe axis) that hold a copy."""
        out: dict[str, list[int]] = {}
        for pipe_stage in range(self.num_stages):
            owned = pp.virtual_stage_indices(pipe_stage, self.num_stages, self.stages_per_rank, self._style())
            for v in owned:
                for idx in range(self.parts[v], self.parts[v + 1]):
                    layer = self._layer_specs[idx]
                    if isinstance(layer, TiedLayerSpec):
                        out.setdefault(layer.key, []).append(pipe_stage)
        return out

    def _style(self) -> str:
        return self.virtual_style

    def _synchronize_tied_weights(self) -> None:
        for key, (ranks, group) in self.mesh.tie_groups.items():
            if group is None:
                continue
            for p in self.tied_modules[key].parameters():
                dist.broadcast(p.data, src=min(ranks), group=group)

    # ------------------------------------------------------------------ running

    def funcs_of(self, start: int, stop: int) -> list[Any]:
        return [self._funcs[i] for i in range(start, stop)]

    def chunks(self) -> list[StageChunk]:
        """One module per pipeline stage this rank runs, in ``virtual_stages`` order."""
        return [StageChunk(self, start, stop) for start, stop in self._owned_ranges()]

    def _checkpointable(self, funcs: list[Any]) -> bool:
        if self.checkpointable_layers is not None:
            return all(type(f).__name__ in self.checkpointable_layers for f in funcs)
        return any(isinstance(f, nn.Module) and any(True for _ in f.parameters()) for f in funcs)

    def run_layers(self, start: int, stop: int, x: Any) -> Any:
        """Layers ``start:stop`` (owned here) on ``x``, checkpointed by ``activation_checkpoint_interval``."""
        self.micro_offset += 1
        offset = self.micro_offset

        def run_range(lo: int, hi: int) -> Callable[..., Any]:
            def run(*inputs: Any) -> Any:
                value = inputs[0] if len(inputs) == 1 else inputs
                for idx in range(lo, hi):
                    if self.seed_layers:
                        self._seed(self.base_seed * (offset + 1) + idx)
                    value = self._funcs[idx](value)
                return value

            return run

        interval = self.activation_checkpoint_interval
        if interval == 0:
            return run_range(start, stop)(x)
        from zerostep.core.activation_checkpointing import checkpoint

        func = self.activation_checkpoint_func or checkpoint
        for lo in range(start, stop, interval):
            hi = min(lo + interval, stop)
            args = x if isinstance(x, tuple) else (x,)
            if self._checkpointable(self.funcs_of(lo, hi)):
                x = func(run_range(lo, hi), *args)
            else:
                x = run_range(lo, hi)(*args)
        return x

    def forward(self, forward_input: Any) -> Any:
        """Every layer this rank owns, in order (the whole model at one stage)."""
        if len(self.virtual_stages) != 1:
            raise RuntimeError("forward() runs one stage; this rank runs several (use chunks())")
        start, stop = self._owned_ranges()[0]
        return self.run_layers(start, stop, forward_input)

    # ------------------------------------------------------------------ DeepSpeed's queries

    def partitions(self) -> list[int]:
        return list(self.parts)

    def stage_owner(self, layer_idx: int) -> int:
        if not 0 <= layer_idx < len(self._layer_specs):
            raise ValueError(f"layer {layer_idx} is outside 0..{len(self._layer_specs) - 1}")
        for v in range(len(self.parts) - 1):
            if self.parts[v] <= layer_idx < self.parts[v + 1]:
                for s in range(self.num_stages):
                    if v in pp.virtual_stage_indices(s, self.num_stages, self.stages_per_rank, self._style()):
                        return s
        raise AssertionError(f"layer {layer_idx} in no part of {self.parts}")

    def topology(self) -> pp.ProcessTopology:
        return self._topo

    def num_pipeline_stages(self) -> int:
        return self.num_stages

    def set_checkpoint_interval(self, interval: int) -> None:
        if int(interval) < 0:
            raise ValueError(f"activation_checkpoint_interval must be >= 0, got {interval}")
        self.activation_checkpoint_interval = int(interval)

    def replicated_names(self) -> set[str]:
        """Parameters this rank holds a copy of that a lower stage also holds (tied modules): counted once
        in the global gradient norm, by the lowest stage."""
        out = set()
        for key, (ranks, _) in self.mesh.tie_groups.items():
            if self.mesh.rank != min(ranks):
                out |= {f"tied_modules.{key}.{n}" for n, _ in self.tied_modules[key].named_parameters()}
        return out


def _needs_counts(method: Any) -> bool:
    return isinstance(method, str) and method.lower() == "parameters"
