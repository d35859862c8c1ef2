"""ZeRO stage 3: parameters live as per-rank shards, gathered unit by unit in forward and backward.

Units are planned like FSDP's per-block wrapping (``plan_units``): every child of the outermost
``nn.ModuleList`` / ``nn.Sequential`` containers is a unit named by its module path (``"layers.3"``), and
the root unit ``ROOT_UNIT`` owns every other parameter (embeddings, final norm, head). A unit's parameters
are packed in a ``FlatLayout`` in compute dtype, padded for the data-parallel world size; stage-3 state is
``{unit name: this rank's shard [layout.shard_numel]}``.

``Zero3Runner.loss_and_grads(shards, call, scale)`` runs ``call(model)`` (the user's loss on a
micro-batch) with the model's parameters replaced, only while they are needed, by views of gathered
buffers:

- the root unit is gathered before ``call`` and stays gathered until its gradients are reduce-scattered at
  the end of backward. A parameter used by several units (tied weights such as GPT's embedding and head)
  is assigned to the root unit for that reason: it is gathered exactly once, for the whole step;
- a forward pre-hook on a unit's module all-gathers its shard into a full buffer [N * S] and swaps views
  of it into the module's ``_parameters``; the forward post-hook swaps the original parameters back and
  frees the buffer's storage (``untyped_storage().resize_(0)``); the views that autograd saved for
  backward keep pointing at that storage;
- a gradient hook on the unit's outputs fires just before the unit's backward: it re-allocates the storage
  and all-gathers into it again, which makes the saved views valid again;
- the full buffer is the output of ``_GatherParams``, an autograd function of the shard, so the unit's
  parameter gradients arrive there as one flat gradient [N * S]; its backward reduce-scatters that
  gradient (a sum over ranks) into the shard gradient [S] and frees the buffer again.

So at any time about one unit's full parameters (plus the root unit's) are alive; ``peak_gathered_bytes``
measures it. With ``prefetch`` (the default at world size > 1) the next unit's all-gather runs in the
background while the current unit computes, so two units are alive at once; with ``overlap_reduce`` a
unit's reduce-scatter runs in the background while the backward of the unit before it goes on (one in
flight at a time, so at most two units' full gradients are alive, never the model's). Both pay on the
measured 4x1024 MLP at 2 gloo ranks (about 15% of the step).

Each forward call of a unit gathers afresh, so a unit called twice works (its gradients add
up). The user's module is only touched inside the call (hooks and swapped ``_parameters`` are undone in a
``finally``); its own parameters are never read, so they may even live on the ``meta`` device.

Limits: a unit must reach its parameters through its own ``forward`` (code outside a unit that reads
``model.layers[0].weight`` sees the original parameter); a unit's output must not alias its parameters;
``torch.utils.checkpoint`` called inside a unit is not supported (its recomputation would read the
swapped-out parameters), whereas checkpointing a whole unit is (``core/activation_checkpointing.py``: the
output gradient hook above refills the storage before the recomputation, which gets the views back);
every rank must call the same units in the same
order (each gather and reduction is a collective), as with FSDP.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves

from .collectives import (
    Group,
    all_gather_flat,
    all_gather_into,
    group_size,
    reduce_scatter_into,
    resolve_group,
)
from .flat import FlatLayout

ROOT_UNIT = "<root>"  # module paths never contain "<", so this cannot collide with a unit's path


@dataclass(frozen=True)
class Unit:
    """A group of parameters gathered together: a block of the model, or the root's leftovers."""

    name: str  # module path of the block, or ROOT_UNIT
    layout: FlatLayout  # entries named by canonical parameter names, compute dtype, dp world size

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def full_bytes(self) -> int:
        """Bytes of the gathered (padded) buffer."""
        return self.layout.padded_numel * torch.empty((), dtype=self.layout.dtype).element_size()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def unit_module_paths(model: nn.Module) -> list[str]:
    """Paths of the children of the outermost ``ModuleList``/``Sequential`` containers, in module order."""
    containers = (nn.ModuleList, nn.Sequential)

    def visit(module: nn.Module, prefix: str) -> list[str]:
        if isinstance(module, containers):
            return [_join(prefix, name) for name, _ in module.named_children()]
        paths = []
        for name, child in module.named_children():
            paths += visit(child, _join(prefix, name))
        return paths

    return visit(model, "")


def plan_units(model: nn.Module, world_size: int = 1, dtype: torch.dtype | None = None) -> list[Unit]:
    """The root unit first (if it owns anything), then one unit per block, each with a padded layout.

    Parameter names are the canonical ones of ``model.named_parameters()`` (first name of a shared
    parameter). A parameter reachable from more than one unit, or from a unit and the root, belongs to the
    root unit. Units without parameters are left out. ``dtype`` is the compute dtype (default: the
    parameters' dtype, which must then be a single one).
    """
    paths = unit_module_paths(model)

    def owner_of(name: str) -> str:
        for path in paths:
            if name.startswith(path + "."):
                return path
        return ROOT_UNIT

    canonical: dict[int, str] = {}  # id(param) -> first name
    owners: dict[int, set[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(param), name)
        owners.setdefault(id(param), set()).add(owner_of(name))
        params[id(param)] = param
    if dtype is None:
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1:
            raise ValueError(f"parameters have several dtypes {sorted(map(str, dtypes))}; pass dtype=")
        dtype = dtypes.pop() if dtypes else torch.float32

    shapes: dict[str, list[tuple[str, tuple[int, ...]]]] = {ROOT_UNIT: [], **{p: [] for p in paths}}
    for key, name in canonical.items():
        unit = owners[key].pop() if len(owners[key]) == 1 else ROOT_UNIT
        shapes[unit].append((name, tuple(params[key].shape)))
    return [
        Unit(name, FlatLayout.build(entries, dtype, world_size))
        for name, entries in shapes.items()
        if entries
    ]


def shard_params(params: Mapping[str, torch.Tensor], units: list[Unit], rank: int) -> dict[str, torch.Tensor]:
    """Full parameters by canonical name -> this rank's shard [shard_numel] per unit (new tensors)."""
    with torch.no_grad():  # parameters may require grad; shards are plain state
        detached = {name: t.detach() for name, t in params.items()}
        return {u.name: u.layout.shard(u.layout.flatten(detached), rank).clone() for u in units}


def gather_params(
    shards: Mapping[str, torch.Tensor], units: list[Unit], group: Group = None
) -> dict[str, torch.Tensor]:
    """Every rank's shards -> full parameters by canonical name (a collective; new tensors)."""
    out: dict[str, torch.Tensor] = {}
    for unit in units:
        full = all_gather_flat(shards[unit.name], group)  # [padded_numel]
        out.update({k: v.clone() for k, v in unit.layout.unflatten(full).items()})
    return out


class _GatherTracker:
    """Live and peak bytes of gathered full buffers during one call."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)


class _Gathered:
    """One gather of one unit: the full buffer [N * S] whose views are the unit's parameters for one call."""

    def __init__(
        self,
        unit: Unit,
        shard: torch.Tensor,
        group: dist.ProcessGroup | None,
        tracker,
        device: torch.device | None = None,
    ):
        self.unit, self.shard, self.group, self.tracker = unit, shard.detach(), group, tracker
        # ``device``: the shard lives in host memory (offload_param) and is gathered on this device:
        # each fill stages it there first, and its gradient goes back to the host
        self.device = shard.device if device is None else device
        self.offloaded = device is not None
        self._staged: torch.Tensor | None = None  # the shard's device copy while a fill may read it
        self.nbytes = unit.full_bytes
        # ``.data`` alias of the autograd-visible buffer: same storage, its own version counter, so
        # re-gathering into it does not count as an in-place change of the views saved for backward.
        self.buffer: torch.Tensor | None = None
        self._full: torch.Tensor | None = None  # the buffer itself until _GatherParams returns it
        self.pending = None  # the async all-gather's Work while a prefetch is in flight
        # Where to leave an asynchronous reduce-scatter (Work, input kept alive) for the runner to wait on;
        # None: reduce synchronously. Only for units gathered once per call: autograd then hands the
        # shard gradient to the caller untouched, whereas a second gather's gradient would be added to it.
        self.async_reductions: list | None = None
        self.live = False

    def _fill(self, async_op: bool) -> None:
        shard = self.shard
        if self.offloaded:  # host -> device (a distinct buffer even where the device is the host)
            shard = self._staged = torch.empty(shard.shape, dtype=shard.dtype, device=self.device)
            shard.copy_(self.shard, non_blocking=True)
        if self.group is None:
            self.buffer.copy_(shard)
        else:
            self.pending = all_gather_into(self.buffer, shard, self.group, async_op=async_op)
        if self.pending is None:
            self._staged = None

    def start(self, async_op: bool = False) -> None:
        """Allocate a new full buffer [padded_numel] and gather into it (in the background if async)."""
        full = torch.empty(self.unit.layout.padded_numel, dtype=self.shard.dtype, device=self.device)
        self._full, self.buffer = full, full.data
        self._fill(async_op)
        self.live = True
        self.tracker.add(self.nbytes)

    def take_full(self) -> torch.Tensor:
        """The gathered buffer, complete; hands over the only reference (no cycle through autograd)."""
        if self._full is None:
            self.start()
        self.wait()
        full, self._full = self._full, None
        return full

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
        self._staged = None

    def regather(self, async_op: bool = False) -> None:
        """Re-allocate the freed storage in place and fill it again (before the unit's backward)."""
        if not self.live and self.buffer is not None:
            self.buffer.untyped_storage().resize_(self.nbytes)
            self._fill(async_op)
            self.live = True
            self.tracker.add(self.nbytes)
        if not async_op:
            self.wait()

    def free(self) -> None:
        self.wait()  # never free storage a collective is still writing
        self._full = None
        if not self.live:
            return
        self.buffer.untyped_storage().resize_(0)
        self.live = False
        self.tracker.add(-self.nbytes)

    def reduce_scatter(self, grad_full: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of the full gradient [N * S] -> this rank's shard gradient [S]."""
        grad_full = grad_full.contiguous()
        if self.group is None:
            return self._home(grad_full)
        grad_shard = torch.empty(self.shard.shape, dtype=self.shard.dtype, device=self.device)
        if self.async_reductions is None:
            reduce_scatter_into(grad_shard, grad_full, self.group)
            return self._home(grad_shard)
        # overlaps the backward of the units before this one
        reductions = self.async_reductions
        # At most one reduction (and its full gradient) stays in flight besides this one: the one
        # before has had this unit's backward to finish, and waiting for it bounds the full
        # gradients alive to two units, not the model (in issue order, the same on every rank).
        while reductions:
            work, _ = reductions.pop(0)
            work.wait()
        work = reduce_scatter_into(grad_shard, grad_full, self.group, async_op=True)
        if not work.done:  # shared memory completes in the call: nothing to keep alive
            reductions.append((work, grad_full))
        return grad_shard

    def _home(self, grad: torch.Tensor) -> torch.Tensor:
        """The shard's gradient where the shard lives (offloaded: copied to the host)."""
        if not self.offloaded:
            return grad
        out = torch.empty(grad.shape, dtype=grad.dtype, device=self.shard.device)
        out.copy_(grad)
        return out


class _GatherParams(torch.autograd.Function):
    """shard [S] -> full buffer [N * S]; backward reduce-scatters the full gradient into the shard's."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, gathered: _Gathered) -> torch.Tensor:
        ctx.gathered = gathered
        return gathered.take_full()

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor):
        gathered = ctx.gathered
        grad_shard = gathered.reduce_scatter(grad_full)
        gathered.free()  # every use of the unit's parameters has produced its gradient by now
        return grad_shard, None


class Zero3Runner:
    """Runs a loss on ``model`` with stage-3 sharded parameters; one instance per (model, units, group).

    ``prefetch``: while a unit computes, all-gather the next one in the background (forward: the unit
    that followed it in the previous call; backward: the unit that preceded it in this call's forward).
    Communication then overlaps compute at the cost of a second unit's full buffer (peak: root unit + two
    units instead of one). It does nothing at world size 1 or in the first call (no recorded order yet).
    """

    def __init__(
        self,
        model: nn.Module,
        units: list[Unit],
        group: Group = None,
        prefetch: bool = True,
        overlap_reduce: bool = True,
        offload_to: torch.device | None = None,
        unit_groups: Mapping[str, Group] | None = None,
    ) -> None:
        """``offload_to``: the shards live in host memory (offload_param) and are gathered on this
        device; reductions then run synchronously, each shard gradient copied back to the host.
        ``unit_groups``: units sharded over a group of their own (MoE experts over their
        expert-data-parallel group), by name; the others over ``group``."""
        self.model, self.units = model, units
        self.offload_to = offload_to
        self.group = resolve_group(group)
        if group_size(self.group) == 1:
            self.group = None  # world size 1: gathers are copies, no collectives
        self._unit_groups: dict[str, dist.ProcessGroup | None] = {}
        for name, own in (unit_groups or {}).items():
            own = resolve_group(own)
            self._unit_groups[name] = None if group_size(own) == 1 else own
        for u in units:
            own = self.group_of(u.name)
            size = 1 if own is None else dist.get_world_size(own)
            if u.layout.world_size != size:
                raise ValueError(
                    f"unit {u.name!r} planned for world size {u.layout.world_size}, its group has "
                    f"{size} ranks"
                )
        self.prefetch = prefetch and self.group is not None
        self.overlap_reduce = overlap_reduce and self.group is not None and offload_to is None
        self._by_name = {u.name: u for u in units}
        # Every place a parameter sits (tied parameters sit in several): canonical name -> [(module, attr)]
        canonical: dict[int, str] = {}
        self._locations: dict[str, list[tuple[nn.Module, str]]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            key = canonical.setdefault(id(param), name)
            module_path, _, attr = name.rpartition(".")
            self._locations.setdefault(key, []).append((model.get_submodule(module_path), attr))
        self._forward_order: list[str] = []  # unit names in call order, recorded by the last call
        self.peak_gathered_bytes = 0  # high-water mark of the last call

    def group_of(self, unit: str) -> dist.ProcessGroup | None:
        """The group unit ``unit`` is gathered and reduced over (None: one rank, copies only)."""
        return self._unit_groups[unit] if unit in self._unit_groups else self.group

    def _swap_in(self, unit: Unit, full: torch.Tensor) -> list[tuple[nn.Module, str, object]]:
        """Put views of ``full`` in place of the unit's parameters; returns what to put back."""
        saved = []
        for name, view in zip(unit.param_names, unit.layout.split(full)):
            for module, attr in self._locations[name]:
                saved.append((module, attr, module._parameters[attr]))
                module._parameters[attr] = view
        return saved

    @staticmethod
    def _swap_out(saved: list[tuple[nn.Module, str, object]]) -> None:
        for module, attr, original in reversed(saved):
            module._parameters[attr] = original

    def loss_and_grads(
        self,
        shards: Mapping[str, torch.Tensor],
        call: Callable[[nn.Module], torch.Tensor],
        scale: float | torch.Tensor = 1.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``call(model)`` and d(loss * scale)/d(shard) per unit, summed over ranks; loss is detached."""
        with self.session(shards) as session:
            loss = session.run(call)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"call(model) must return a scalar tensor, got {type(loss).__name__}")
            grads = session.grads(loss * scale)
        return loss.detach(), grads

    def session(self, shards: Mapping[str, torch.Tensor], track_grads: bool = True) -> Zero3Session:
        """A forward/backward split in two calls (DeepSpeed's ``engine(x)`` then ``engine.backward``):
        ``run(call)`` any number of times, then ``grads(loss)`` once; use as a context manager (its exit
        frees every gathered buffer and removes the hooks, also after an error)."""
        return Zero3Session(self, shards, track_grads)


class Zero3Session:
    """One micro-batch of a ``Zero3Runner``: hooks installed on entry, gradients out of ``grads``."""

    def __init__(self, runner: Zero3Runner, shards: Mapping[str, torch.Tensor], track_grads: bool) -> None:
        self.runner = runner
        self.tracker = _GatherTracker()
        self.leaves = {u.name: shards[u.name].detach().requires_grad_(track_grads) for u in runner.units}
        self.gathers: list[_Gathered] = []  # every gather of this session, for the final clean-up
        self.unit_calls: list[_Gathered] = []  # block-unit gathers in forward call order
        self.prefetched: dict[str, _Gathered] = {}  # unit name -> gather started ahead of its forward
        self.swapped: list[list] = []
        self.active: dict[str, list[tuple[_Gathered, list]]] = {}  # unit -> stack of open forward calls
        self.order = runner._forward_order if runner.prefetch else []
        self.reductions: list = []  # asynchronous reduce-scatters in flight
        self.handles: list = []
        self.unit_hooks: dict[str, tuple[Callable, Callable]] = {}  # unit -> its forward (pre, post) hooks
        self.open = False

    def __enter__(self) -> Zero3Session:
        self.open = True
        try:
            for unit in self.runner.units:
                if unit.name == ROOT_UNIT:
                    self._enter(unit, self._new_gather(unit))  # gathered for the whole call
                    continue
                pre, post = self._make_hooks(unit)
                self.unit_hooks[unit.name] = (pre, post)
                module = self.runner.model.get_submodule(unit.name)
                self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _new_gather(self, unit: Unit) -> _Gathered:
        runner = self.runner
        group = runner.group_of(unit.name)
        gathered = _Gathered(unit, self.leaves[unit.name], group, self.tracker, runner.offload_to)
        self.gathers.append(gathered)
        return gathered

    def _enter(self, unit: Unit, gathered: _Gathered) -> None:
        full = _GatherParams.apply(self.leaves[unit.name], gathered)  # [padded_numel], grad-connected
        saved = self.runner._swap_in(unit, full)
        self.swapped.append(saved)
        self.active.setdefault(unit.name, []).append((gathered, saved))

    def _prefetch_backward(self, index: int):
        def hook(grad):
            self.unit_calls[index].regather()
            if self.runner.prefetch and index > 0:
                self.unit_calls[index - 1].regather(async_op=True)

        return hook

    def _make_hooks(self, unit: Unit):
        runner = self.runner

        def pre_forward(module, args):
            index = len(self.unit_calls)
            gathered = self.prefetched.pop(unit.name, None) or self._new_gather(unit)
            self.unit_calls.append(gathered)
            order = self.order
            if index + 1 < len(order) and order[index] == unit.name:
                upcoming = order[index + 1]
                if upcoming not in self.prefetched:
                    self.prefetched[upcoming] = self._new_gather(runner._by_name[upcoming])
                    self.prefetched[upcoming].start(async_op=True)
            self._enter(unit, gathered)

        def post_forward(module, args, output):
            gathered, saved = self.active[unit.name].pop()
            runner._swap_out(saved)
            self.swapped.remove(saved)
            gathered.free()
            hook = self._prefetch_backward(self.unit_calls.index(gathered))
            for tensor in tree_leaves(output):
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(hook)

        return pre_forward, post_forward

    def run(self, call: Callable[[nn.Module], object]) -> object:
        """``call(model)`` with the units gathered as it reaches them; returns what ``call`` returns."""
        if not self.open:
            raise RuntimeError("Zero3Session.run outside its context (use it as `with runner.session(...)`)")
        return call(self.runner.model)

    def complete_forward(self) -> None:
        """After ``call`` raised on this rank: issue the gathers the rest of its forward would have, so
        that the other ranks' forward collectives pair with this rank's and every rank reaches the next
        collective together (the engine's step-failure vote, core/step_failure.py). Nothing is computed:
        open unit calls are closed, then every unit not called yet is gathered and freed, in the last
        call's order (module order before the first call), prefetches included as in a real forward."""
        runner = self.runner
        for name, calls in self.active.items():
            while name != ROOT_UNIT and calls:
                self.unit_hooks[name][1](None, (), None)  # post-forward: swap out, free
        planned = runner._forward_order or [u.name for u in runner.units if u.name != ROOT_UNIT]
        for name in planned[len(self.unit_calls) :]:
            pre, post = self.unit_hooks[name]
            pre(None, ())
            post(None, (), None)

    def _end_forward(self) -> None:
        runner = self.runner
        for saved in reversed(self.swapped):  # backward no longer needs the module's attributes
            runner._swap_out(saved)
        self.swapped.clear()
        for gathered in self.prefetched.values():  # predicted, never used: release before backward
            gathered.free()
        self.prefetched.clear()
        runner._forward_order = [g.unit.name for g in self.unit_calls]
        if runner.overlap_reduce:
            calls = Counter(g.unit.name for g in self.unit_calls)  # the root unit is gathered once
            for gathered in self.gathers:
                if calls[gathered.unit.name] <= 1:
                    gathered.async_reductions = self.reductions

    def grads(self, loss: torch.Tensor, retain_graph: bool = False) -> dict[str, torch.Tensor]:
        """d(loss)/d(shard) per unit (summed over ranks); a unit the loss never used gets zeros."""
        self._end_forward()
        names = list(self.leaves)
        grads = torch.autograd.grad(
            loss, [self.leaves[n] for n in names], allow_unused=True, retain_graph=retain_graph
        )
        for work, _ in self.reductions:
            work.wait()
        self.reductions.clear()
        return {n: torch.zeros_like(self.leaves[n]) if g is None else g for n, g in zip(names, grads)}

    def close(self) -> None:
        """Remove hooks, restore the module's parameters, wait for collectives, free every buffer."""
        if not self.open:
            return
        self.open = False
        for handle in self.handles:
            handle.remove()
        for saved in reversed(self.swapped):
            self.runner._swap_out(saved)
        self.swapped.clear()
        for work, _ in self.reductions:  # only after an error: leave no collective running
            work.wait()
        self.reductions.clear()
        for gathered in self.gathers:
            gathered.free()
        self.runner.peak_gathered_bytes = self.tracker.peak


def loss_and_grads(
    model: nn.Module,
    shards: Mapping[str, torch.Tensor],
    call: Callable[[nn.Module], torch.Tensor],
    group: Group = None,
    scale: float | torch.Tensor = 1.0,
    units: list[Unit] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One-shot ``Zero3Runner(model, units, group).loss_and_grads(shards, call, scale)``."""
    if units is None:
        dtype = next(iter(shards.values())).dtype
        units = plan_units(model, group_size(group), dtype)
    return Zero3Runner(model, units, group).loss_and_grads(shards, call, scale)
