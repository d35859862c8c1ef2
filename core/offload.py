"""ZeRO-Offload: master weights and optimizer state in host memory, the update on the CPU.

``zero_optimization.offload_optimizer: {device: cpu}`` keeps this rank's master shard and optimizer
state in (with ``pin_memory``, pinned) host memory; compute-dtype parameters and gradients stay on the
device. Graph A (the global norm and finite check) runs on the device as without offload; graph B is
replaced by ``HostUpdate``, which per chunk of the flat shards (``parallel.host_transfer``):

    device gradient chunk --(to host)--> host gradient buffer        [chunk]  grad dtype (fp32 with
    host update: unscale, clip, optimizer.update_ on the host master  [chunk]   convert_grad_on_cpu off)
    host parameter buffer (compute dtype) --(to device)--> params     [chunk]  (stages 1-2: this rank's row)

pipelined so that the copy of one chunk overlaps the update of the next. The update is zerostep's own
(``optim.adam`` and friends: torch.optim's arithmetic, so results equal training without offload bit
for bit in fp32), run on host tensors, compiled (dynamic shapes: one graph for every chunk) when the
engine compiles. Chunks are ``zero_optimization.sub_group_size`` elements (DeepSpeed's unit of the
offloaded optimizer step); with the default every unit is one chunk.

Only elementwise updates can be cut into chunks: Adam/AdamW, Lion, SGD, Adagrad. Their 0-d step
counters are shared by every chunk's call, so each chunk after the first starts from the counters'
values before the step. With parameter groups (per-group factor vectors, keyed by unit) the update
runs once over every host buffer after all gradients have landed; the copies back are still chunked.

``offload_param`` (stage 3, with ``offload_optimizer``) keeps the compute-dtype shards in host memory
too: the host update writes them there, and ``parallel.zero3`` stages each unit's shard on the device
when it gathers it and copies the reduced gradient back.

On a CPU engine the "device" is host memory too: the master and optimizer state are then separate host
buffers from the parameters, and every copy and the chunked ordering run as on a GPU (that is what the
CPU tests exercise); only streams, events and pinning are CUDA-only.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import optree
import torch

from zerostep.core.compiling import compile_private
from zerostep.core.state import FlatParams, TrainState
from zerostep.core.step import StepPlan, make_apply_update
from zerostep.errors import ConfigError
from zerostep.parallel.host_transfer import Chunk, HostTransfer, plan_chunks, run_pipeline

# Updates that are elementwise over the flat shards, so any chunk of them can be updated alone.
ELEMENTWISE_OPTIMIZERS = ("adam", "adamw", "lion", "sgd", "adagrad")
_KEY = "chunk"  # the one group name of a chunk's pytrees: every chunk's call has the same structure
_PATH = "zero_optimization.offload_optimizer"

# offload_optimizer keys that zerostep accepts and that change nothing, with why (warned when set)
_NO_EFFECT = {
    "nvme_path": "it names the NVMe swap folder, and zerostep offloads to cpu only",
    "buffer_count": "it sizes DeepSpeed's NVMe swap buffers",
    "pipeline_read": "it pipelines DeepSpeed's NVMe reads",
    "pipeline_write": "it pipelines DeepSpeed's NVMe writes",
    "fast_init": "it speeds up DeepSpeed's NVMe swap initialization",
    "super_offload": "it selects DeepSpeed's SuperOffload (Grace-Hopper) path; the update is zerostep's",
    "cpuadam_cores_perc": "it sets DeepSpeed's CPU Adam thread count; the host update uses torch's threads",
    "ratio": "zerostep offloads the whole optimizer state (ratio 1); partial offload is not implemented",
}


@dataclasses.dataclass(frozen=True)
class OffloadSettings:
    params: bool  # offload_param (stage 3): the compute-dtype shards live in host memory too
    pin_memory: bool  # pinned host buffers (CUDA only): the copies can run asynchronously
    chunk_numel: int | None  # elements per pipelined chunk (sub_group_size); None: one per unit
    convert_grad_on_cpu: bool  # gradients cross in their own dtype and are widened on the host


def settings_of(config: Any, device: torch.device, stage: int) -> OffloadSettings | None:
    """The offload this config asks for (None: none), with a warning for each key that has no effect
    here. ``offload_param`` is not implemented: a warning says parameters stay on the device."""
    zero = config.zero_optimization
    block = zero.offload_optimizer
    params = zero.offload_param is not None and stage == 3  # other stages: the config warned
    if params and block is None:
        warnings.warn(
            "zero_optimization.offload_param has no effect without offload_optimizer in zerostep: the "
            "parameter shards are updated where the master lives, so they stay in device memory; add "
            '"offload_optimizer": {"device": "cpu"}',
            stacklevel=5,
        )
    if block is None:
        return None
    if params:
        for key in ("buffer_count", "buffer_size", "max_in_cpu"):
            if config.source(f"zero_optimization.offload_param.{key}") not in ("default", "derived"):
                warnings.warn(
                    f"zero_optimization.offload_param.{key} has no effect in zerostep: it sizes DeepSpeed's "
                    "NVMe parameter swapping",
                    stacklevel=5,
                )
    for key, why in _NO_EFFECT.items():
        if config.source(f"{_PATH}.{key}") not in ("default", "derived"):
            warnings.warn(f"{_PATH}.{key} has no effect in zerostep: {why}", stacklevel=5)
    if device.type == "cpu":
        warnings.warn(
            f"{_PATH} on a CPU engine saves no memory: the master weights and optimizer state are kept "
            "in host buffers apart from the parameters, and each step copies gradients and parameters "
            "through them (as on a GPU)" + ("; pin_memory has no effect here" if block.pin_memory else ""),
            stacklevel=5,
        )
    chunk = int(zero.sub_group_size)
    return OffloadSettings(
        params=params,
        pin_memory=bool(block.pin_memory or (params and zero.offload_param.pin_memory)),
        chunk_numel=chunk if chunk > 0 else None,
        convert_grad_on_cpu=bool(block.convert_grad_on_cpu),
    )


def check_optimizer(name: str) -> None:
    """ConfigError unless the optimizer's update runs over host shards chunk by chunk."""
    if name not in ELEMENTWISE_OPTIMIZERS:
        raise ConfigError(
            f"{_PATH}: the {name!r} optimizer cannot run offloaded; zerostep's host update supports "
            f"{', '.join(ELEMENTWISE_OPTIMIZERS)} (elementwise updates over the flat shards)"
        )


class Offload:
    """One engine's offload: where state is placed, the host update, the bytes it moves."""

    def __init__(self, settings: OffloadSettings, plan: StepPlan, device: torch.device) -> None:
        self.settings = settings
        self.plan = plan
        self.transfer = HostTransfer(device, settings.pin_memory)
        self.update: HostUpdate | None = None

    # ---------------------------------------------------------------- placement

    def placed(self, state: TrainState) -> TrainState:
        """``state`` with its master and optimizer state in host memory apart from the parameters: a
        tensor on the device, unpinned where pinning was asked, or sharing storage with a parameter
        buffer (a state loaded from a checkpoint is built on the device first, and fp32 parameters of
        the master's shape are read as the master itself) is copied to new host memory; others stay."""
        flats = dict(state.params.flats)
        if self.settings.params:  # offload_param: the shards too, apart from the master
            taken = {m.untyped_storage().data_ptr() for m in state.master.values()}
            moved = {
                g: p
                if p.device.type == "cpu" and p.untyped_storage().data_ptr() not in taken
                else self.transfer.host_copy(p)
                for g, p in flats.items()
            }
        else:
            device = self.transfer.device
            moved = {g: p if p.device == device else p.to(device) for g, p in flats.items()}
        params = state.params
        if any(moved[g] is not flats[g] for g in flats):
            params = FlatParams(moved, dict(self.plan.layouts), sharded=state.params.sharded)
        taken = {p.untyped_storage().data_ptr() for p in moved.values()}

        def home(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            pinned = t.is_pinned() or not self.transfer.pin_memory
            if t.device.type == "cpu" and pinned and t.untyped_storage().data_ptr() not in taken:
                return t
            return self.transfer.host_copy(t)

        master = {g: home(m) for g, m in state.master.items()}
        return state.replace(master=master, opt_state=optree.tree_map(home, state.opt_state), params=params)

    def staging_bytes(self) -> int:
        """Host buffers the update keeps between steps (gradients in, parameters out)."""
        if self.update is not None and self.update.grads:
            tensors = [*self.update.grads.values(), *self.update.params.values()]
            return sum(t.numel() * t.element_size() for t in tensors)
        plan = self.plan
        numel = sum(
            lay.shard_numel if plan.sharded_master else lay.padded_numel for lay in plan.layouts.values()
        )
        grad = plan.accumulation_dtype if plan.accumulation_steps > 1 else plan.compute_dtype
        if not self.settings.convert_grad_on_cpu:
            grad = torch.float32
        item = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
        return numel * (item(grad) + item(plan.compute_dtype))

    def moved_bytes(self) -> dict[str, int]:
        """Bytes copied device -> host and host -> device since the engine was built."""
        return {"to_host": self.transfer.bytes_to_host, "to_device": self.transfer.bytes_to_device}

    # ---------------------------------------------------------------- the update

    def host_update(
        self, plan: StepPlan, optimizer: Any, group: Any, compile: bool, chunked: bool
    ) -> HostUpdate:
        """Graph B's replacement, for ``make_sharded_update(apply_update=...)``. ``chunked``: the update
        itself runs chunk by chunk (elementwise optimizer, no per-group factor vectors)."""
        check_optimizer(optimizer.name)
        self.plan = plan
        self.update = HostUpdate(plan, self.settings, self.transfer, optimizer, group, compile, chunked)
        return self.update


class HostUpdate:
    """``apply_update(grads, master, opt_state, params, sumsq, scale, lr, beta1, param_rows)`` with the
    master and optimizer state on the host (see the module docstring)."""

    def __init__(
        self,
        plan: StepPlan,
        settings: OffloadSettings,
        transfer: HostTransfer,
        optimizer: Any,
        group: Any,
        compile: bool,
        chunked: bool,
    ) -> None:
        self.plan, self.settings, self.transfer, self.chunked = plan, settings, transfer, chunked
        numels = {
            g: lay.shard_numel if plan.sharded_master else lay.padded_numel for g, lay in plan.layouts.items()
        }
        self.chunks = plan_chunks(numels, settings.chunk_numel if chunked else None)
        update = make_apply_update(plan, optimizer, group, compile=False)  # unscale, clip, update_
        if compile:  # one graph for every chunk length (dynamic), or the whole buffers (static)
            update = compile_private(update, dynamic=chunked, fullgraph=True)
        self._apply: Callable[..., None] = update
        self.grads: dict[str, torch.Tensor] = {}  # host gradient buffers [shard], kept between steps
        self.params: dict[str, torch.Tensor] = {}  # host compute-dtype parameter buffers [shard]

    def _host_buffer(self, store: dict[str, torch.Tensor], g: str, like: torch.Tensor, dtype: torch.dtype):
        buf = store.get(g)
        if buf is None or buf.dtype != dtype or buf.numel() != like.numel():
            buf = store[g] = self.transfer.host_empty(like.numel(), dtype)
        return buf

    def __call__(
        self,
        grads: dict[str, Any],
        master: dict[str, torch.Tensor],
        opt_state: Any,
        params: dict[str, torch.Tensor],
        sumsq: torch.Tensor,
        scale: torch.Tensor,
        lr: torch.Tensor,
        beta1: torch.Tensor | None,
        param_rows: dict[str, torch.Tensor] | None,
    ) -> None:
        plan = self.plan
        targets = params if plan.params_match_master else param_rows  # device buffers [shard]
        device_grads = {}
        for g, t in grads.items():  # one process: per-parameter gradients, concatenated on the device
            flat = t if isinstance(t, torch.Tensor) else plan.layouts[g].concat(t)
            device_grads[g] = flat if self.settings.convert_grad_on_cpu else flat.float()
        host_grads = {g: self._host_buffer(self.grads, g, t, t.dtype) for g, t in device_grads.items()}
        host_params = {g: self._host_buffer(self.params, g, master[g], plan.compute_dtype) for g in master}
        host = torch.device("cpu")
        scalars = [x if x is None else x.to(host) for x in (sumsq, scale, lr, beta1)]

        def fetch(c: Chunk) -> Any:
            return self.transfer.to_host(host_grads[c.group][c.lo : c.hi], device_grads[c.group][c.lo : c.hi])

        def store(c: Chunk) -> None:
            self.transfer.to_device(targets[c.group][c.lo : c.hi], host_params[c.group][c.lo : c.hi])

        try:
            if self.chunked:
                counters = _counters(opt_state)
                before = [t.clone() for t in counters]
                first = self.chunks[0] if self.chunks else None

                def update(c: Chunk) -> None:
                    if c is not first:  # every chunk advances the shared step counters from the same values
                        for t, b in zip(counters, before):
                            t.copy_(b)
                    piece = lambda tree: {_KEY: tree[c.group][c.lo : c.hi]}  # noqa: E731
                    state = _restrict(opt_state, frozenset(master), c, master)
                    self._apply(
                        piece(host_grads),
                        piece(master),
                        state,
                        piece(host_params),
                        *scalars,
                        piece(host_params),
                    )

                run_pipeline(self.chunks, fetch, update, store, self.transfer.wait)
            else:  # per-group options: one update over every buffer once all gradients are in
                handles = [fetch(c) for c in self.chunks]
                for h in handles:
                    self.transfer.wait(h)
                self._apply(host_grads, master, opt_state, host_params, *scalars, host_params)
                for c in self.chunks:
                    store(c)
        finally:
            self.transfer.finish()  # later device work (the all-gather, the next forward) sees the copies


def _counters(opt_state: Any) -> list[torch.Tensor]:
    """The optimizer state's 0-d tensors (step counters), which every chunk's call advances."""
    return [t for t in optree.tree_leaves(opt_state) if isinstance(t, torch.Tensor) and t.dim() == 0]


def _restrict(tree: Any, groups: frozenset, chunk: Chunk, master: dict[str, torch.Tensor]) -> Any:
    """``tree`` (the optimizer state) with every mapping keyed by the units replaced by ``{_KEY: that
    unit's buffer, sliced to the chunk}``; other leaves (the counters) are shared as they are."""
    if isinstance(tree, dict):
        if groups and set(tree) == groups:
            leaf = tree[chunk.group]
            full = master[chunk.group].numel()
            if isinstance(leaf, torch.Tensor) and leaf.dim() == 1 and leaf.numel() == full:
                return {_KEY: leaf[chunk.lo : chunk.hi]}
            return {_KEY: _restrict(leaf, groups, chunk, master)}
        return {k: _restrict(v, groups, chunk, master) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple states
        return type(tree)(*(_restrict(v, groups, chunk, master) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_restrict(v, groups, chunk, master) for v in tree)
    return tree
