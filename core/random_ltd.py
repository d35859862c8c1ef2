"""Random layer-wise token dropping (random-LTD; Yao et al., 2022; DeepSpeed's ``data_routing.random_ltd``).

In training, each converted layer listed in ``random_ltd_layer_id`` runs on a random subset of
``reserved_length`` tokens of each sequence (kept in their order); the other tokens skip the layer
unchanged. The count follows DeepSpeed's ``fixed_linear`` schedule, a pure function of the step:

    reserved(t) = min(r - r % seq_per_step, max_value),
    r = floor(t / require_steps * (max_value - min_value) + min_value)

where ``t`` is the step's ``global_steps`` (0 at the first step: DeepSpeed updates the scheduler in
the forward prologue from the steps already taken). Consumed layer tokens, as DeepSpeed counts them,
add ``train_batch_size * (reserved(t) * random_ltd_layer_num + max_value * (total_layer_num -
random_ltd_layer_num))`` per step (``max_value`` for the layers that keep every token, whatever the
batch's actual length).

Conversion (``convert_to_random_ltd``): a plain module's layers are wrapped in RandomLayerTokenDrop
(DeepSpeed's wrapper; their parameter names gain ``.random_ltd_layer``), which the engine binds at
initialize; the facade engine's layers are converted in place (their ``forward`` replaced by an
InPlaceTokenDrop), since the engine is built on the parameter names, and bound then.

Differences from DeepSpeed, none visible in the distribution of what is computed: each layer draws its
own subset (DeepSpeed draws all layers' subsets at layer 0; both are independent uniform subsets per
layer and sample), and tokens come from the torch generator, which the functional step seeds from the
state's seed and step (equal states give equal steps). Layers are matched to ``random_ltd_layer_id`` by
their index among the converted layers in ``named_modules`` order (DeepSpeed looks for the id's digits
in the module name, which agrees for the usual ``layers.<i>`` names).

Compile: the kept-token count changes as the schedule ramps (up to ``(max - min) / seq_per_step + 1``
values, each a new shape inside every dropping layer), so with random-LTD the engine runs forward and
backward eagerly, as with progressive layer drop, and says so; the optimizer update stays compiled.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from zerostep.core.config import Config
from zerostep.core.config.data_efficiency import RandomLTDConfig, RandomLTDScheduleConfig


def reserved_length(schedule: RandomLTDScheduleConfig, global_steps: int) -> int:
    """Tokens kept per sequence in the dropping layers at the step starting at ``global_steps``."""
    s = schedule.schedule_config
    value = math.floor(
        float(global_steps) / s.require_steps * (schedule.max_value - schedule.min_value) + schedule.min_value
    )
    value -= value % s.seq_per_step
    return min(value, schedule.max_value)


def consumed_layer_tokens(config: RandomLTDConfig, global_steps: int, train_batch_size: int) -> int:
    """Layer tokens DeepSpeed's RandomLTDScheduler counts for the steps before ``global_steps``."""
    schedule = config.random_ltd_schedule
    dropping, full = config.random_ltd_layer_num, config.total_layer_num - config.random_ltd_layer_num
    total, step = 0, 0
    while step < global_steps:  # the ramp step by step, then the plateau at max_value at once
        value = reserved_length(schedule, step)
        if value >= schedule.max_value:
            total += (global_steps - step) * (value * dropping + schedule.max_value * full)
            break
        total += value * dropping + schedule.max_value * full
        step += 1
    return train_batch_size * total


class Router:
    """What the converted layers of one model share: the config, and the count of this forward
    (``None`` outside a training step of the engine: the layers then run on every token)."""

    def __init__(self, config: RandomLTDConfig) -> None:
        self.config = config
        self.reserved: int | None = None


class RandomLayerTokenDrop(nn.Module):
    """A layer that, in training, runs on ``reserved_length`` random tokens and passes the rest through.

    ``layer(hidden_states, *args, **kwargs)`` returns a tensor shaped like its input (or a tuple whose
    first item is); ``hidden_states`` is (batch, seq, ...) or (seq, batch, ...) per the config's
    ``hidden_state_order``. The attention mask, given as the keyword ``model_mask_name``, is cut to the
    kept tokens: its top-left ``reserved x reserved`` block for a decoder (a causal mask stays causal),
    its kept rows and columns for an encoder.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.random_ltd_layer = layer  # DeepSpeed's attribute name (state-dict keys gain ".random_ltd_layer")
        self.router: Router | None = None
        self.random_ltd_layer_id = -1

    def init_config(self, router: Router, layer_id: int) -> None:
        self.router = router
        self.random_ltd_layer_id = layer_id

    @property
    def reserved_length(self) -> int | None:
        return None if self.router is None else self.router.reserved

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return drop_tokens(self.random_ltd_layer, self.router, self.training, hidden_states, args, kwargs)


class InPlaceTokenDrop:
    """Random-LTD on a layer without renaming it: the layer's ``forward`` is replaced by this (an
    instance attribute), which calls the original on the kept tokens. For a model converted after the
    engine was built on its parameter names (``convert_to_random_ltd(engine, LayerClass)``)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.original = layer.forward  # the bound method of the layer's class
        self.router: Router | None = None
        self.random_ltd_layer_id = -1

    def init_config(self, router: Router, layer_id: int) -> None:
        self.router = router
        self.random_ltd_layer_id = layer_id

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return drop_tokens(self.original, self.router, self.layer.training, hidden_states, args, kwargs)


def drop_tokens(
    layer: Any, router: Router | None, training: bool, hidden_states: torch.Tensor, args: tuple, kwargs: dict
) -> Any:
    """``layer(hidden_states, *args, **kwargs)`` on this step's kept tokens (all of them outside training)."""
    keep = None if router is None else router.reserved
    config = None if router is None else router.config
    seq_dim = 0 if config is not None and config.hidden_state_order == "seq_batch_dim" else 1
    if not training or keep is None or keep >= hidden_states.shape[seq_dim]:
        return layer(hidden_states, *args, **kwargs)
    batch_dim = 1 - seq_dim
    index = kept_token_indices(
        keep, hidden_states.shape[seq_dim], hidden_states.shape[batch_dim], hidden_states.device
    )
    name = config.model_mask_name
    if name is not None:
        if name not in kwargs:
            raise TypeError(
                f"random_ltd: model_mask_name is {name!r} but the layer was called without that keyword "
                f"argument (got {sorted(kwargs)}); pass the mask as {name}=..."
            )
        if kwargs[name] is not None:
            kwargs = {**kwargs, name: cut_mask(kwargs[name], index, config.model_type)}
    part = gather_tokens(hidden_states, index, seq_dim)
    outputs = layer(part, *args, **kwargs)
    first = outputs[0] if isinstance(outputs, tuple) else outputs
    if not isinstance(first, torch.Tensor) or first.shape != part.shape:
        raise TypeError(
            "random_ltd: the wrapped layer must return a tensor shaped like its input "
            f"{tuple(part.shape)} (or a tuple starting with one); got "
            f"{tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__}"
        )
    merged = scatter_tokens(hidden_states, first, index, seq_dim)
    return (merged, *outputs[1:]) if isinstance(outputs, tuple) else merged


def kept_token_indices(keep: int, seq: int, batch: int, device: torch.device) -> torch.Tensor:
    """(batch, keep) int64: a uniform random subset of ``range(seq)`` per sample, in increasing order."""
    order = torch.rand(batch, seq, device=device).argsort(dim=1)  # a random permutation per sample
    return order[:, :keep].sort(dim=1).values


def _along(index: torch.Tensor, like: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """(batch, keep) indices laid out for gather/scatter on ``like`` along ``seq_dim``."""
    if seq_dim == 0:
        index = index.t()  # (keep, batch)
    shape = (*index.shape, *([1] * (like.dim() - 2)))
    return index.reshape(shape).expand(*index.shape, *like.shape[2:])


def gather_tokens(hidden: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    return hidden.gather(seq_dim, _along(index, hidden, seq_dim))


def scatter_tokens(
    hidden: torch.Tensor, part: torch.Tensor, index: torch.Tensor, seq_dim: int
) -> torch.Tensor:
    """``hidden`` (in ``part``'s dtype) with the kept tokens replaced by ``part`` (out of place)."""
    return hidden.to(part.dtype).scatter(seq_dim, _along(index, hidden, seq_dim), part)


def cut_mask(mask: torch.Tensor, index: torch.Tensor, model_type: str) -> torch.Tensor:
    """The attention mask (..., seq, seq) of the kept tokens (DeepSpeed's gpt/bert sampling rules)."""
    keep = index.shape[1]
    if mask.dim() < 2:
        raise ValueError(
            f"random_ltd: the attention mask must end in (seq, seq); got shape {tuple(mask.shape)}"
        )
    if model_type == "decoder":
        return mask[..., :keep, :keep]
    if mask.dim() < 3:
        raise ValueError(
            f"random_ltd: an encoder's mask must be (batch, ..., seq, seq); got shape {tuple(mask.shape)}"
        )
    batch, seq = index.shape[0], mask.shape[-1]
    mask = mask.expand(batch, *mask.shape[1:])  # a mask broadcast over the batch (leading 1)
    middle = mask.shape[1:-2]
    ones = [1] * len(middle)
    rows = index.reshape(batch, *ones, keep, 1).expand(batch, *middle, keep, seq)
    cols = index.reshape(batch, *ones, 1, keep).expand(batch, *middle, keep, keep)
    return mask.gather(-2, rows).gather(-1, cols)


def convert_to_random_ltd(model: nn.Module, layer_class: type[nn.Module]) -> nn.Module:
    """Convert every (outermost) ``layer_class`` module of ``model`` for random-LTD, in place.

    An ``nn.Module`` (before ``initialize``): each layer is wrapped in a RandomLayerTokenDrop, as in
    DeepSpeed. A zerostep facade engine (DeepSpeed's usual order, after ``deepspeed.initialize``): the
    layers of ``engine.module`` keep their names (the engine is built on them) and get an
    InPlaceTokenDrop forward; then ``engine.random_ltd_initialize()`` binds them to the schedule."""
    initialize = getattr(model, "random_ltd_initialize", None)
    root = getattr(model, "module", model)
    names = [
        n
        for n, m in root.named_modules()
        if isinstance(m, layer_class) and n and "random_ltd_layer" not in n.split(".")  # not converted twice
    ]
    outermost = [n for n in names if not any(n.startswith(f"{o}.") for o in names if o != n)]
    if not outermost:
        raise ValueError(
            f"convert_to_random_ltd: the model has no {layer_class.__name__} module to convert (or all of "
            "them are converted already)"
        )
    for name in outermost:
        layer = root.get_submodule(name)
        if callable(initialize):
            if not isinstance(layer.__dict__.get("forward"), InPlaceTokenDrop):
                layer.forward = InPlaceTokenDrop(layer)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, RandomLayerTokenDrop(layer))
    if callable(initialize):
        initialize()
    return model


def converted_layers(model: nn.Module) -> list[RandomLayerTokenDrop | InPlaceTokenDrop]:
    """The model's converted layers, in ``named_modules`` order."""
    found: list[RandomLayerTokenDrop | InPlaceTokenDrop] = []
    for module in model.modules():
        if isinstance(module, RandomLayerTokenDrop):
            found.append(module)
        elif isinstance(module.__dict__.get("forward"), InPlaceTokenDrop):
            found.append(module.__dict__["forward"])
    return found


def remove_random_ltd_state_dict(state_dict: Mapping[str, Any]) -> OrderedDict:
    """A state dict with the wrappers' ``.random_ltd_layer`` taken out of its keys (DeepSpeed's saves)."""
    return OrderedDict((key.replace(".random_ltd_layer", ""), value) for key, value in state_dict.items())


class RandomLTD:
    """The engine's side: binds the model's converted layers and sets each training step's count."""

    def __init__(self, config: RandomLTDConfig, model: nn.Module, train_batch_size: int) -> None:
        self.config = config
        self.train_batch_size = train_batch_size
        self.router = Router(config)
        self.layers: list[RandomLayerTokenDrop | InPlaceTokenDrop] = []
        if converted_layers(model):
            self.bind(model)  # converted before initialize

    def bind(self, model: nn.Module) -> None:
        """Give the converted layers listed in ``random_ltd_layer_id`` this engine's schedule."""
        converted = converted_layers(model)
        ids = self.config.random_ltd_layer_id
        if ids[-1] >= len(converted):
            raise ValueError(
                f"random_ltd_layer_id {list(ids)} names layer {ids[-1]} but the model has "
                f"{len(converted)} converted layers"
            )
        self.layers = [converted[i] for i in ids]
        for count, layer in enumerate(self.layers):
            layer.init_config(self.router, count)

    @classmethod
    def of(cls, config: Config, model: nn.Module) -> RandomLTD | None:
        ltd = config.data_efficiency.data_routing.random_ltd
        return cls(ltd, model, int(config.train_batch_size)) if ltd.enabled else None

    def warn_eager(self) -> None:
        warnings.warn(
            "random_ltd: the kept-token count changes as its schedule ramps, so forward and backward run "
            "eagerly (a compiled forward would recompile for every count); the optimizer update stays "
            "compiled",
            stacklevel=4,
        )

    def reserved_length(self, global_steps: int) -> int:
        return reserved_length(self.config.random_ltd_schedule, global_steps)

    def consumed_layer_tokens(self, global_steps: int) -> int:
        return consumed_layer_tokens(self.config, global_steps, self.train_batch_size)

    @contextlib.contextmanager
    def at(self, global_steps: int) -> Iterator[None]:
        """Within: the converted layers of a training forward keep this step's count of tokens."""
        if not self.layers:
            raise ValueError(
                "data_efficiency.data_routing.random_ltd is enabled but the model has no converted layer: "
                "call convert_to_random_ltd(model, LayerClass) (zerostep.runtime.data_pipeline.data_routing"
                ".helper) on the nn.Module before initialize, or on the facade engine after it"
            )
        self.router.reserved = self.reserved_length(global_steps)
        try:
            yield
        finally:
            self.router.reserved = None


class SchedulerView:
    """DeepSpeed's ``engine.random_ltd_scheduler`` read-outs, computed from the engine's step."""

    def __init__(self, ltd: RandomLTD, steps: Any) -> None:
        self._ltd = ltd
        self._steps = steps  # () -> (global_steps, whether that step's forward has run)

    def _last_forward_step(self) -> int:
        """The step of the last training forward: DeepSpeed updates its scheduler there (-1: none yet)."""
        steps, in_step = self._steps()
        return int(steps) if in_step else int(steps) - 1

    def get_current_seq(self) -> int:
        """The count of the last training forward (min_value before the first)."""
        step = self._last_forward_step()
        schedule = self._ltd.config.random_ltd_schedule
        return self._ltd.reserved_length(step) if step >= 0 else schedule.min_value

    def get_random_ltd_layer_num(self) -> int:
        return self._ltd.config.random_ltd_layer_num

    def get_total_layer_tokens(self, train_iters: int) -> int:
        return self._ltd.consumed_layer_tokens(train_iters)

    def state_dict(self) -> dict[str, int]:
        step = self._last_forward_step()
        schedule = self._ltd.config.random_ltd_schedule
        return {
            "consumed_layer_tokens": self._ltd.consumed_layer_tokens(step + 1),
            "current_steps": step,
            "current_value": self.get_current_seq(),
            "min_value": schedule.min_value,
            "max_value": schedule.max_value,
        }
