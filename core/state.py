"""``TrainState``: everything that decides the next step, as one pytree of tensors.

Parameters live in flat buffers, one per parameter group (a group is a ZeRO unit: a transformer block,
or the root module's remaining parameters). ``FlatParams`` holds those buffers as its pytree children
and the layouts (names, shapes, offsets) as static metadata, and reads like a ``{name: tensor}``
mapping for stages 0-2, where each value is a view into the group's full buffer. At stage 3 every
buffer is only this rank's shard; use ``engine.full_params(state)`` for the gathered values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import optree
import torch
from optree import registry as _optree_registry

from zerostep.core.precision import ScalerState
from zerostep.parallel.flat import FlatLayout

# Registered in optree's global namespace so plain ``optree.tree_map(f, state)`` sees through the state.
_GLOBAL = getattr(_optree_registry, "__GLOBAL_NAMESPACE")


class Metrics(NamedTuple):
    loss: torch.Tensor  # fp32 [], mean over micro-batches and ranks
    grad_norm: torch.Tensor  # fp32 [], global, unscaled, before clipping; inf/nan on overflow
    lr: torch.Tensor  # fp32 [], the learning rate this step used (or would have used)
    loss_scale: torch.Tensor  # fp32 [], the scale this step's backward used
    skipped: torch.Tensor  # int64 [], 1 when non-finite gradients skipped the update


def empty_metrics() -> Metrics:
    nan = float("nan")
    return Metrics(
        loss=torch.tensor(nan),
        grad_norm=torch.tensor(nan),
        lr=torch.tensor(nan),
        loss_scale=torch.tensor(nan),
        skipped=torch.tensor(0, dtype=torch.int64),
    )


class FlatParams(Mapping):
    """Group name -> flat compute-dtype buffer, readable as parameter name -> tensor (stages 0-2).

    At stages 1-2 with ``overlap_param_gather`` the step returns while the parameter all-gathers are still
    running (the next step's forward waits for each unit just before it runs). Every read through this
    object (``flats``, ``params[name]``, flattening the state as a pytree) first waits for them, so
    nothing outside the engine sees a buffer in flight; ``wait()`` does it explicitly."""

    def __init__(
        self,
        flats: dict[str, torch.Tensor],
        layouts: dict[str, FlatLayout],
        sharded: bool,
        in_flight: Any = None,
    ):
        self._flats = flats
        self.layouts = layouts
        self.sharded = sharded
        self._in_flight = in_flight  # an object with wait_all(): the gathers still filling the buffers
        self._where = {e.name: g for g, lay in layouts.items() for e in lay.entries}

    @property
    def flats(self) -> dict[str, torch.Tensor]:
        """The buffers, complete (waits for gathers in flight)."""
        self.wait()
        return self._flats

    def wait(self) -> FlatParams:
        """Block until every collective still writing these buffers has finished."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.wait_all()
        return self

    def take_in_flight(self) -> tuple[dict[str, torch.Tensor], Any]:
        """For the engine's step: the buffers without waiting, and the gathers still filling them (or
        None), which the caller now owns and must wait for."""
        in_flight, self._in_flight = self._in_flight, None
        return self._flats, in_flight

    def set_in_flight(self, in_flight: Any) -> None:
        self.wait()
        self._in_flight = in_flight

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy, pickle, torch.save: complete buffers, and no collective handles
        self.wait()
        return dict(self.__dict__)

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.sharded:
            raise KeyError(
                f"{name!r}: stage-3 params hold only this rank's shard; use engine.full_params(state)"
            )
        group = self._where[name]
        return self.layouts[group].unflatten(self.flats[group])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        kind = "sharded" if self.sharded else "full"
        return f"FlatParams({kind}, groups={list(self._flats)}, params={len(self)})"


optree.register_pytree_node(
    FlatParams,
    lambda fp: (tuple(fp.flats.values()), (tuple(fp.flats), tuple(fp.layouts.items()), fp.sharded)),
    lambda meta, children: FlatParams(dict(zip(meta[0], children)), dict(meta[1]), meta[2]),
    namespace=_GLOBAL,
)


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The whole training state; ``engine.step`` consumes it and returns the next one.

    - ``step``: int64 [], optimizer steps taken, skipped ones included (DeepSpeed's ``global_steps``)
    - ``skipped_steps``: int64 [], steps skipped for non-finite gradients; the LR schedule advances
      only on applied steps, so update ``k`` uses ``schedule(step - skipped_steps - 1)``
    - ``seed``: int64 [], base of the per-step RNG seed (dropout), so equal states give equal steps
    - ``params``: ``FlatParams`` in compute dtype (full for stages 0-2, this rank's shard for stage 3)
    - ``master``: group -> fp32 flat buffer (the whole padded buffer at stage 0, this rank's shard at
      stages 1-3). In fp32 with an unsharded buffer it is the same tensor as the params buffer.
    - ``opt_state``: the optimizer's state over ``master``
    - ``scaler``: loss-scale state
    - ``metrics``: the last step's metrics
    """

    step: torch.Tensor
    skipped_steps: torch.Tensor
    seed: torch.Tensor
    params: FlatParams
    master: dict[str, torch.Tensor]
    opt_state: Any
    scaler: ScalerState
    metrics: Metrics

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)

    def block_until_ready(self) -> TrainState:
        """Wait for every collective still writing this state's buffers (the overlapped parameter
        all-gather of stages 1-2), as ``jax.block_until_ready``; returns the state. Reading the state
        waits by itself; this is for timing and for handing buffers to code outside zerostep."""
        devices = {t.device for t in self.params.flats.values() if t.device.type == "cuda"}  # waits
        for device in devices:  # on CUDA, Work.wait() only orders the stream; wait for the device too
            torch.cuda.synchronize(device)
        return self


_FIELDS = tuple(f.name for f in dataclasses.fields(TrainState))

optree.register_pytree_node(
    TrainState,
    lambda s: (tuple(getattr(s, n) for n in _FIELDS), None, _FIELDS),
    lambda _, children: TrainState(*children),
    namespace=_GLOBAL,
)


class ConsumedStateError(RuntimeError):
    """A state already passed to ``engine.step`` (which donates and updates it in place) was reused."""


_CONSUMED = "_zerostep_consumed"
_DONATED = (
    "this TrainState was already passed to engine.step, which donates its input and updates its buffers "
    "in place; use the state that engine.step returned"
)


def mark_consumed(state: TrainState, reason: str | None = None) -> None:
    """Mark ``state`` as not to be used again; ``reason`` (default: it was donated to a step that
    returned its successor) is what ``check_not_consumed`` will say."""
    object.__setattr__(state, _CONSUMED, reason or _DONATED)


def unmark_consumed(state: TrainState) -> None:
    if is_consumed(state):
        object.__delattr__(state, _CONSUMED)


def is_consumed(state: TrainState) -> bool:
    return bool(getattr(state, _CONSUMED, False))


def check_not_consumed(state: TrainState, what: str) -> None:
    reason = getattr(state, _CONSUMED, None)
    if reason:
        raise ConsumedStateError(f"{what}: {reason if isinstance(reason, str) else _DONATED}")
