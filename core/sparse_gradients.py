"""``sparse_gradients: true``: embedding gradients reduced as rows, DeepSpeed's sparse all-reduce.

An embedding's gradient is zero outside the rows its batch looked up. DeepSpeed's stage-0 engine keeps
such a gradient as (indices, values), all-gathers both over the data-parallel ranks (each rank touched a
different number of rows) and sums the rows that repeat, instead of all-reducing the dense [V, D] table;
the other gradients are all-reduced in dtype buckets as usual. Here:

- every trainable ``nn.Embedding`` / ``nn.EmbeddingBag`` built with ``sparse=True`` gets a forward that
  passes its weight through a tap (``_Tap``): the sparse gradient autograd computes for the table goes
  to this module's ``_Sink`` instead of into the flat gradient buffer, whose slot for the table stays
  zero. The tap acts only when the module runs on the engine's tensors (``functional_call``); called
  on its own ``nn.Parameter`` the module behaves as built;
- ``SparseReducer`` (the step's phase 3 at stage 0) accumulates the dense gradients as the plain
  reducers do, all-reduces each flat buffer *except* the tables' slots, and for each table coalesces its
  rows over the micro-batches, all-gathers indices and values (``parallel/sparse_rows.py``), sums the
  repeated rows and adds them into the slot: the update then sees the same dense gradient as without
  sparse gradients (up to summation order), so optimizer, clipping and checkpoints are unchanged.

Bytes: a dense table costs ``2 V D`` elements per step (all-reduce); the rows cost ``N * max_r(n_r)``
rows of ``D`` values plus an int32 index each. ``SparseGradients.comm_plans`` drops the tables from the
engine's static plan and the reducer records the rows it moved in the engine's ``CommCounter``.

Under ``torch.compile`` sparse tensors do not trace ("torch.compile does not support sparse Tensors"):
the tapped forward is ``torch._dynamo.disable``d, so the embedding lookup and its backward run eagerly
between the compiled pieces of the model (a graph break per table), measured in tests/test_sparse_gradients.

DeepSpeed reduces sparse gradients at stage 0 only (its ZeRO optimizers reduce dense); at stages 1-3
zerostep warns that the key has no effect. A ``sparse=True`` embedding that does not go through this path
(the key off, another stage, a table tied to another parameter) has its ``sparse`` flag cleared: it
trains with a dense gradient, which the flat buffers need. DeepSpeed also turns the dense gradients of
``sparse=False`` embeddings into rows (by scanning for non-zero rows); zerostep reduces as rows exactly the
tables built with ``sparse=True``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from zerostep import optim
from zerostep.core.reducers import Reducer, _in_dtype, _predivide
from zerostep.parallel import collectives, sparse_rows
from zerostep.parallel.collectives import ALL_GATHER, CommCounter, CommPlan

if TYPE_CHECKING:
    from zerostep.core.step import StepPlan


@dataclasses.dataclass(frozen=True)
class SparseTable:
    """A table whose gradient is reduced as rows: where it sits in the flat buffers."""

    name: str  # the parameter's name (module path + ".weight")
    group: str  # its flat group (ZeRO unit)
    index: int  # its entry's position in the group's layout
    offset: int  # first element of its slot in the group's flat buffer
    rows: int  # V
    dim: int  # D


class _Sink:
    """Sparse gradients the taps received during the current backward, by table name."""

    def __init__(self) -> None:
        self.grads: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, grad: torch.Tensor) -> None:
        self.grads.setdefault(name, []).append(grad)

    def take(self) -> dict[str, list[torch.Tensor]]:
        grads, self.grads = self.grads, {}
        return grads


class _Tap(torch.autograd.Function):
    """Identity on the table; its backward hands the (sparse) gradient to the sink and returns none,
    so nothing flows into the flat buffer the table is a view of."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, sink: _Sink, name: str) -> torch.Tensor:
        ctx.sink, ctx.name = sink, name
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        ctx.sink.add(ctx.name, grad)
        return None, None, None


def _tapped_forward(module: nn.Module, sink: _Sink, name: str, compile: bool) -> Any:
    """``module``'s forward with its weight through a ``_Tap`` when it runs on the engine's tensors;
    ``compile``: excluded from dynamo's graphs (sparse tensors do not trace), it runs eagerly between them."""

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        weight = module.weight
        if not isinstance(weight, nn.Parameter):  # functional_call's view of the flat buffer
            weight = _Tap.apply(weight, sink, name)
        if isinstance(module, nn.EmbeddingBag):
            return _embedding_bag(module, weight, *args, **kwargs)
        (indices,) = args
        return F.embedding(
            indices, weight, module.padding_idx, module.max_norm, module.norm_type,
            module.scale_grad_by_freq, sparse=True,
        )  # fmt: skip

    # importing dynamo costs seconds: only engines that compile pay it
    return torch.compiler.disable(forward) if compile else forward


def _embedding_bag(
    module: nn.EmbeddingBag,
    weight: torch.Tensor,
    input: torch.Tensor,
    offsets: torch.Tensor | None = None,
    per_sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    return F.embedding_bag(
        input, weight, offsets, module.max_norm, module.norm_type, module.scale_grad_by_freq,
        module.mode, True, per_sample_weights, module.include_last_offset, module.padding_idx,
    )  # fmt: skip


def sparse_embeddings(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> every ``nn.Embedding`` / ``nn.EmbeddingBag`` built with ``sparse=True``."""
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
    }


def _weight_name(path: str) -> str:
    return f"{path}.weight" if path else "weight"


class SparseGradients:
    """The sparse path of one engine: its tables, the taps' sink, the reducer (module docstring)."""

    def __init__(self, plan: StepPlan, group: Any, tables: list[SparseTable], sink: _Sink) -> None:
        self.plan, self.group, self.tables, self.sink = plan, group, tables, sink
        self.counter: CommCounter | None = None  # the engine's, set by comm_plans

    @staticmethod
    def of(
        config: Any, model: nn.Module, plan: StepPlan, group: Any, compile: bool
    ) -> SparseGradients | None:
        """Set up ``config.sparse_gradients`` for ``model``; None when the sparse path does not apply
        (then every ``sparse=True`` embedding is made dense, so that it trains). ``compile``: whether
        the engine compiles its forward."""
        modules = sparse_embeddings(model)
        if not config.sparse_gradients:
            _make_dense(modules)
            return None
        if plan.stage != 0:
            warnings.warn(
                f"sparse_gradients has no effect at ZeRO stage {plan.stage}: gradients are reduced dense "
                "(DeepSpeed reduces sparse gradients at stage 0 only)",
                stacklevel=5,
            )
            _make_dense(modules)
            return None
        optimizer = getattr(config.optimizer, "type", None)
        if optimizer in optim.COMPRESSED_OPTIMIZER_TYPES:
            raise ValueError(
                f"sparse_gradients with the {optimizer} optimizer: its compressed all-reduce replaces the "
                "gradient reduction; use one or the other"
            )
        tables = []
        # one sink per model, shared by every engine built on it: whichever engine runs a backward takes
        # the rows right after it (reducer.add), so a later engine's taps never starve an earlier one
        sink = model.__dict__.setdefault("_zerostep_sparse_sink", _Sink())
        appearances: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            appearances[id(p)] = appearances.get(id(p), 0) + 1
        where = {e.name: (g, i, e) for g, lay in plan.layouts.items() for i, e in enumerate(lay.entries)}
        for path, module in modules.items():
            name = _weight_name(path)
            if name not in where:  # frozen: no gradient to reduce
                continue
            if appearances[id(module.weight)] > 1:
                warnings.warn(
                    f"sparse_gradients: {name} is tied to another parameter, whose gradient is dense; "
                    "it is reduced dense",
                    stacklevel=5,
                )
                _make_dense({path: module})
                continue
            g, i, entry = where[name]
            tables.append(SparseTable(name, g, i, entry.offset, entry.shape[0], entry.shape[1]))
            module.forward = _tapped_forward(module, sink, name, compile)
        if not tables:
            warnings.warn(
                "sparse_gradients has no effect: the model has no trainable nn.Embedding or "
                "nn.EmbeddingBag built with sparse=True (untied)",
                stacklevel=5,
            )
            return None
        return SparseGradients(plan, group, tables, sink)

    def reducer(self) -> SparseReducer:
        return SparseReducer(self)

    def comm_plans(self, optimizer: Any, counter: CommCounter) -> tuple[CommPlan, CommPlan]:
        """The engine's static (applied, skipped) step plans without the tables' all-reduce; the rows'
        all-gathers are recorded in ``counter`` as they run (their size depends on the batch)."""
        from zerostep.core.accounting import step_comm_plan

        self.counter = counter
        plan = self.plan
        with_tables = {t.group for t in self.tables}
        others = {g: lay for g, lay in plan.layouts.items() if g not in with_tables}
        rest = dataclasses.replace(plan, layouts=others)
        dense = CommPlan()
        for g in with_tables:
            numel = plan.layouts[g].padded_numel - sum(t.rows * t.dim for t in self.tables if t.group == g)
            dense = dense + collectives.all_reduce_plan(numel, plan.compute_dtype, plan.world_size)
        applied = step_comm_plan(rest, applied=True, optimizer=optimizer) + dense
        return applied, step_comm_plan(rest, applied=False) + dense

    def dense_segments(self, group: str) -> list[tuple[int, int]]:
        """``[start, stop)`` ranges of ``group``'s padded buffer outside its tables' slots."""
        out, at = [], 0
        for t in sorted((t for t in self.tables if t.group == group), key=lambda t: t.offset):
            if t.offset > at:
                out.append((at, t.offset))
            at = t.offset + t.rows * t.dim
        if at < self.plan.layouts[group].padded_numel:
            out.append((at, self.plan.layouts[group].padded_numel))
        return out


def _make_dense(modules: dict[str, nn.Module]) -> None:
    for module in modules.values():
        module.sparse = False  # the same values; a dense gradient the flat buffers can hold
        module.__dict__.pop("forward", None)  # an earlier engine's tap: the last engine built decides


class SparseReducer(Reducer):
    """Phase 3 at stage 0 with sparse tables: dense all-reduce outside the tables' slots, rows
    all-gathered and summed into them (module docstring). No gradient hooks: reductions run at the
    boundary, after backward."""

    def __init__(self, sparse: SparseGradients) -> None:
        plan = sparse.plan
        super().__init__(plan.accumulation_dtype)
        self.sparse, self.plan = sparse, plan
        self.rows: dict[str, list[torch.Tensor]] = {}  # table -> its sparse gradients since the boundary

    def reset(self) -> None:
        self.sparse.sink.take()
        self.rows.clear()
        super().reset()

    def add(self, grads: Any, last: bool) -> None:
        self._accumulate(grads, last)
        for name, received in self.sparse.sink.take().items():
            self.rows.setdefault(name, []).extend(received)
        if last:
            self.acc = self._reduce(self.acc)

    def _reduce(self, acc: dict[str, Any]) -> dict[str, Any]:
        plan, group = self.plan, self.sparse.group
        pre = _predivide(plan)
        several = plan.world_size > 1
        if several:
            out = {}
            for g, flat in acc.items():
                flat = _in_dtype(flat, plan.compute_dtype, pre)  # a new buffer: reduced in place below
                for start, stop in self.sparse.dense_segments(g):
                    for a, b in collectives.bucket_bounds(stop - start, plan.reduce_bucket_numel):
                        collectives.all_reduce_into(flat[start + a : start + b], group)
                out[g] = flat
            acc = out
        device = _device_of(acc)
        for table in self.sparse.tables:
            indices, values = self._local_rows(table, device)
            if pre is not None:
                values = values * pre
            if several:
                indices, values = self._gather(table, indices, values)
            slot = acc[table.group]
            if isinstance(slot, list):  # one process: per-parameter gradients
                slot = slot[table.index]
            else:
                slot = plan.layouts[table.group].split(slot)[table.index]
            slot.index_add_(0, indices, values.to(slot.dtype))  # repeated rows are summed here
        self.rows.clear()
        return acc

    def _local_rows(self, table: SparseTable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [n] int64, values [n, D] fp32): this rank's rows, summed over the micro-batches."""
        received = self.rows.get(table.name, [])
        if not received:
            return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, table.dim, device=device)
        indices, values = [], []
        for grad in received:
            if grad.is_sparse:  # [V, D] with sparse_dim 1: indices [1, k], values [k, D], repeats allowed
                indices.append(grad._indices()[0])
                values.append(grad._values().float())
            else:  # a dense gradient (not from the lookup itself): every row
                indices.append(torch.arange(table.rows, device=grad.device))
                values.append(grad.float())
        rows, inverse = torch.unique(torch.cat(indices), return_inverse=True)  # [n], [k total]
        summed = torch.zeros(rows.numel(), table.dim, device=rows.device)
        summed.index_add_(0, inverse, torch.cat(values))
        return rows, summed  # [n], [n, D]

    def _gather(
        self, table: SparseTable, indices: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's rows, concatenated (repeats not yet summed); values sent in the compute dtype."""
        group, dtype = self.sparse.group, self.plan.compute_dtype
        counts = sparse_rows.all_gather_counts(torch.tensor([indices.numel()], device=indices.device), group)
        counts = counts[:, 0].tolist()
        narrow = torch.int32 if table.rows < 2**31 else torch.int64  # DeepSpeed narrows indices too
        gathered_indices = sparse_rows.all_gather_uneven(indices.to(narrow), counts, group).long()
        gathered_values = sparse_rows.all_gather_uneven(values.to(dtype), counts, group)
        counter = self.sparse.counter
        if counter is not None:  # the counts, the indices, the values; the engine counts the step
            row_bytes = narrow.itemsize + table.dim * dtype.itemsize
            nbytes = sparse_rows.uneven_gather_bytes(counts, row_bytes) + 8 * len(counts)
            counter.bytes_by_kind[ALL_GATHER] = counter.bytes_by_kind.get(ALL_GATHER, 0) + nbytes
            counter.calls_by_kind[ALL_GATHER] = counter.calls_by_kind.get(ALL_GATHER, 0) + 3
        return gathered_indices, gathered_values


def _device_of(acc: dict[str, Any]) -> torch.device:
    for value in acc.values():
        return value[0].device if isinstance(value, list) else value.device
    return torch.device("cpu")
