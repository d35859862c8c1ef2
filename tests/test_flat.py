"""Flat layouts: shard then gather is the identity (hypothesis cases of named tensors of mixed dtypes,
world sizes 1-5), and entries and shards start on 16-byte boundaries with zero padding between them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from zerostep import io as zio
from zerostep.core.gpt import GPT, GPTConfig
from zerostep.parallel import flat as flat_module
from zerostep.parallel.collectives import all_gather_flat
from zerostep.parallel.flat import ALIGN_BYTES, ALIGN_ELEMENTS, FlatLayout
from zerostep.parallel.launch import spawn_ranks
from zerostep.parallel.zero3 import plan_units

DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")

# A case is a list of (shape, dtype name); dims of 0 give empty tensors, small dims give tensors smaller
# than the world size.
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
cases = st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=6)


def _tensors(case: list, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic values for a case (every rank builds the same ones)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (shape, dtype_name) in enumerate(case):
        dtype = getattr(torch, dtype_name)
        if dtype == torch.bool:
            value = torch.randint(0, 2, shape, generator=g).bool()
        elif dtype.is_floating_point:
            value = torch.randn(shape, generator=g).to(dtype)
        else:
            value = torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)
        out[f"t{i}"] = value
    return out


def _layouts(tensors: dict[str, torch.Tensor], world_size: int) -> dict[torch.dtype, FlatLayout]:
    """One flat layout per dtype, as ZeRO builds them."""
    by_dtype: dict[torch.dtype, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault(t.dtype, {})[name] = t
    return {dtype: FlatLayout.of(group, world_size) for dtype, group in by_dtype.items()}


def _padding_values(layout: FlatLayout, flat: torch.Tensor) -> torch.Tensor:
    """Every element of ``flat`` outside the layout's entries, in one 1-D tensor."""
    return torch.cat([flat[a:b] for a, b in layout.padding()] or [flat[:0]])


def _roundtrip(case: list, seed: int, world_size: int, rank: int, gather) -> None:
    tensors = _tensors(case, seed)
    for dtype, layout in _layouts(tensors, world_size).items():
        full = layout.flatten(tensors)  # [padded_numel]
        assert full.numel() == layout.padded_numel == layout.shard_numel * world_size
        shard_numel = -(-max(1, -(-layout.extent // world_size)) // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
        assert layout.shard_numel == shard_numel == zio.shard_numel(layout.extent, world_size)
        assert not _padding_values(layout, full).any(), "padding must be zero"
        shard = layout.shard(full, rank).clone()
        assert shard.numel() == layout.shard_numel and shard.dtype == dtype
        gathered = gather(layout, full, shard)
        assert gathered.dtype == dtype and gathered.numel() == layout.padded_numel
        assert not _padding_values(layout, gathered).any(), "padding must be zero after gathering"
        for name, view in layout.unflatten(gathered).items():
            assert view.shape == tensors[name].shape and torch.equal(view, tensors[name]), name


@given(case=cases, world_size=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_shards_concatenate_to_the_flat_buffer(case, world_size, seed):
    """Single process: the world's shards, concatenated in rank order, are the padded flat buffer."""

    def gather(layout, full, shard):
        shards = [layout.shard(full, r).clone() for r in range(world_size)]
        return torch.cat(shards)

    for rank in range(world_size):
        _roundtrip(case, seed, world_size, rank, gather)


def _draw_cases(n: int) -> list:
    """``n`` hypothesis-generated cases (deterministic under the repo profile), to ship to ranks at once."""
    drawn = []

    @settings(max_examples=n, database=None)
    @given(case=cases)
    def collect(case):
        drawn.append(case)

    collect()
    return drawn


def _gather_all_cases(rank: int, world_size: int, all_cases: list) -> int:
    for i, case in enumerate(all_cases):
        try:
            _roundtrip(case, i, world_size, rank, lambda _layout, _full, shard: all_gather_flat(shard))
        except Exception as e:
            raise AssertionError(f"case {i} {case} at world size {world_size}: {e}") from e
    return len(all_cases)


def test_draw_cases_cover_edge_shapes():
    drawn = _draw_cases(40)
    numels = [torch.Size(shape).numel() for case in drawn for shape, _ in case]
    assert 0 in numels and any(0 < n < 5 for n in numels)
    assert len({dtype for case in drawn for _, dtype in case}) >= 5


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shard_then_gather_is_identity_on_real_ranks(world_size):
    """One spawn per world size runs every case through the real gloo all-gather (the layouts of world
    sizes up to 9 are checked in process by the alignment property; 4-5 real ranks on 2 cores cost
    40 s of suite time for no other path)."""
    drawn = _draw_cases(40)
    if world_size == 1:
        assert _gather_all_cases(0, 1, drawn) == len(drawn)
        return
    assert spawn_ranks(_gather_all_cases, world_size, drawn, timeout=120) == [len(drawn)] * world_size


# ---------------------------------------------------------------------------------------------------------
# Alignment (issue 13 item 6): entries and shards start on 16-byte boundaries, padding stays zero


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


big_shapes = st.lists(st.integers(0, 37), min_size=0, max_size=3).map(tuple)


@settings(max_examples=150)
@given(
    shapes=st.lists(big_shapes, min_size=1, max_size=8),
    dtype=st.sampled_from(DTYPES),
    world_size=st.integers(1, 9),
)
def test_entries_and_shards_start_16_byte_aligned_without_overlap(shapes, dtype, world_size):
    dtype = getattr(torch, dtype)
    layout = FlatLayout.build([(f"t{i}", s) for i, s in enumerate(shapes)], dtype, world_size)
    # in elements: a multiple of 16, so aligned in every dtype that shares the layout (fp32 master,
    # bf16 parameters, fp8...); entries in order, each at the first aligned offset after the previous
    at = 0
    for e in layout.entries:
        assert e.offset % ALIGN_ELEMENTS == 0 and e.offset >= at
        assert e.offset - at < ALIGN_ELEMENTS, "no more padding than alignment needs"
        at = e.end
    assert layout.extent == at <= layout.padded_numel
    assert layout.shard_numel % ALIGN_ELEMENTS == 0
    # padding() is exactly the complement of the entries
    covered = torch.zeros(layout.padded_numel, dtype=torch.int32)
    for e in layout.entries:
        covered[e.offset : e.end] += 1
    for a, b in layout.padding():
        assert a < b
        covered[a:b] += 1
    assert bool((covered == 1).all())
    # views of a freshly allocated buffer, and every rank's shard, start on 16-byte boundaries
    flat = torch.zeros(layout.padded_numel, dtype=dtype)
    assert flat.data_ptr() % ALIGN_BYTES == 0
    for view in layout.split(flat):
        assert view.data_ptr() % ALIGN_BYTES == 0
    for r in range(world_size):
        assert layout.shard(flat, r).data_ptr() % ALIGN_BYTES == 0
    # concat is split's inverse, zero over the padding; split's backward is zero there too
    values = torch.arange(layout.padded_numel, dtype=torch.float64) + 1
    again = layout.concat(layout.split(values))
    assert torch.equal(again, layout.zero_padding(values.clone()))
    assert not _padding_values(layout, again).any()
    leaf = values.clone().requires_grad_(True)
    sum(v.sum() for v in layout.split(leaf)).backward()
    assert not _padding_values(layout, leaf.grad).any() and int(leaf.grad.sum()) == layout.numel


def test_align_one_is_the_old_back_to_back_packing():
    layout = FlatLayout.build([("a", (3,)), ("b", (2, 5))], torch.float32, 3, align=1)
    assert [e.offset for e in layout.entries] == [0, 3]
    assert (layout.shard_numel, layout.padding()) == (5, ((13, 15),))
    aligned = layout.with_world_size(2)
    assert aligned.align == 1 and aligned.shard_numel == 7
    with pytest.raises(ValueError, match="align"):
        FlatLayout.build([("a", (3,))], torch.float32, align=0)


class _ThreeLinear(nn.Module):
    """The issue's example: Linear(1000, 999) three times in one (root) unit."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(1000, 999) for _ in range(3))

    def forward(self, x):
        return self.c(self.b(self.a(x)[..., :1000].relu())[..., :1000])


def _unaligned_views(dtype: torch.dtype) -> tuple[int, int]:
    with torch.device("meta"):
        model = _ThreeLinear()
    bad = total = 0
    for unit in plan_units(model, 1, dtype):
        flat = torch.empty(unit.layout.padded_numel, dtype=dtype)
        for view in unit.layout.split(flat):
            total += 1
            bad += view.data_ptr() % ALIGN_BYTES != 0
    return bad, total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_three_linear_1000_999_have_no_unaligned_views(dtype, monkeypatch):
    assert _unaligned_views(dtype) == (0, 6)
    monkeypatch.setattr(flat_module, "ALIGN_ELEMENTS", 1)  # the packing before alignment
    assert _unaligned_views(dtype)[0] == 4


def _unaligned_shards(n_embd: int, world_size: int = 8) -> tuple[int, int]:
    """Shard starts (bytes, bf16) of a GPT-2-shaped model's units at ``world_size`` ranks."""
    cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=2, n_head=12, n_embd=n_embd)
    with torch.device("meta"):
        model = GPT(cfg)
    bad = total = 0
    for unit in plan_units(model, world_size, torch.bfloat16):
        for r in range(world_size):
            total += 1
            bad += unit.layout.shard_range(r)[0] * 2 % ALIGN_BYTES != 0
    return bad, total


def test_gpt2_shapes_at_8_ranks_in_bf16_have_no_unaligned_shards(monkeypatch):
    # GPT-2's vocabulary and context; 768 wide (GPT-2 small) and 780 (12 heads of 65, an odd width)
    assert _unaligned_shards(768) == (0, 24)
    assert _unaligned_shards(780) == (0, 24)
    monkeypatch.setattr(flat_module, "ALIGN_ELEMENTS", 1)
    assert _unaligned_shards(780) == (15, 24)  # before alignment


# ---------------------------------------------------------------------------------------------------------
# The engine over aligned layouts: padding never reaches results, and old checkpoints still load

OPTIMIZERS = {
    "adamw": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
    "lion": {"type": "Lion", "params": {"lr": 1e-3, "weight_decay": 0.1}},
    "lamb": {"type": "Lamb", "params": {"lr": 1e-2, "weight_decay": 0.1}},
    "adagrad": {"type": "Adagrad", "params": {"lr": 1e-2}},
    "muon": {"type": "Muon", "params": {"lr": 2e-2, "weight_decay": 0.1}},
}
TB = 6


def _engine(optimizer: str = "adamw", stage: int = 0, world_size: int = 1, align: int | None = None):
    """An eager engine over ``tests.models.Net`` (odd shapes: its entries leave gaps); ``align`` builds it
    with another packing (1: the one before alignment)."""
    from models import Net, mse

    from zerostep.core import Config, initialize

    config = {
        "train_batch_size": TB,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": stage},
        "optimizer": OPTIMIZERS[optimizer],
    }
    saved = flat_module.ALIGN_ELEMENTS
    flat_module.ALIGN_ELEMENTS = align or saved
    try:
        cfg = Config.from_dict(config, world_size=world_size)
        return initialize(Net(), cfg, loss_fn=mse, compile=False)
    finally:
        flat_module.ALIGN_ELEMENTS = saved


def _batches(n: int):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(TB, 5, generator=gen), torch.randn(TB, 1, generator=gen)) for _ in range(n)]


def _run(engine, state, batches, rank: int = 0, world_size: int = 1):
    per = TB // world_size
    for x, y in batches:
        state = engine.step(state, (x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]))
    return state


def _flat_leaves(engine, state) -> dict[str, tuple[str, torch.Tensor]]:
    """Every buffer laid out like a master buffer (master and optimizer state): path -> (group, tensor)."""
    from zerostep.core.checkpointing import _flat_group, _opt_leaves

    out = {f"master/{g}": (g, m) for g, m in state.master.items()}
    for path, leaf in _opt_leaves(state.opt_state).items():
        g = _flat_group(path, leaf, state.master)
        if g is not None:
            out[f"opt_state/{path}"] = (g, leaf)
    return out


def _by_name(engine, state) -> dict[str, torch.Tensor]:
    """Every flat buffer (whole, one process) cut into parameters: '<path>:<param>' -> values."""
    out = {}
    for path, (g, t) in _flat_leaves(engine, state).items():
        for name, view in engine.plan.layouts[g].unflatten(t).items():
            out[f"{path}:{name}"] = view
    return out


def _assert_padding_zero(engine, state, rank: int = 0) -> None:
    for path, (g, t) in _flat_leaves(engine, state).items():
        layout = engine.plan.layouts[g]
        lo = layout.shard_range(rank)[0] if engine.plan.sharded_master else 0
        for a, b in layout.padding():
            a, b = max(a - lo, 0), min(b - lo, t.numel())
            assert a >= b or not t[a:b].any(), f"{path}: padding [{a}, {b}) is not zero"


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_padding_stays_zero_and_never_reaches_results(optimizer):
    """Aligned and back-to-back packings of the same model take the same steps (per-leaf reductions such
    as LAMB's trust ratios and Muon's matrices see parameters, never padding), and padding stays zero."""
    aligned, packed = _engine(optimizer), _engine(optimizer, align=1)
    assert any(lay.padding()[:-1] for lay in aligned.plan.layouts.values()), "the model must leave gaps"
    batches = _batches(3)
    a, p = _run(aligned, aligned.init(), batches), _run(packed, packed.init(), batches)
    torch.testing.assert_close(a.metrics.grad_norm, p.metrics.grad_norm, rtol=1e-6, atol=0)
    got, want = _by_name(aligned, a), _by_name(packed, p)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)
    _assert_padding_zero(aligned, a)


def test_a_checkpoint_written_before_alignment_still_loads(tmp_path, monkeypatch):
    """A checkpoint of the back-to-back packing (entries at other offsets, shards of ceil(numel / W))
    loads into an aligned engine, into new memory and in place, and training goes on as before."""
    from zerostep.io import manifest

    batches = _batches(4)
    with monkeypatch.context() as m:
        m.setattr(manifest, "SHARD_ALIGN", 1)
        old = _engine(align=1)
        state = _run(old, old.init(), batches[:2])
        old.save(state, tmp_path, tag="old")
        saved = {k: v.clone() for k, v in _by_name(old, state).items()}  # the next steps donate state
        after = old.full_params(_run(old, state, batches[2:]))
    new = _engine()
    offsets = {e.name: e.offset for lay in old.plan.layouts.values() for e in lay.entries}
    moved = [e.name for lay in new.plan.layouts.values() for e in lay.entries if e.offset != offsets[e.name]]
    assert moved, "the old packing must put some entries elsewhere"
    for into in (None, new.init()):
        state = new.load(tmp_path, tag="old", into=into)
        assert int(state.step) == 2
        got = _by_name(new, state)
        for key in saved:
            assert torch.equal(got[key], saved[key]), key
        _assert_padding_zero(new, state)
        resumed = new.full_params(_run(new, state, batches[2:]))
        for name in after:
            torch.testing.assert_close(resumed[name], after[name], rtol=1e-5, atol=1e-7, msg=name)


def test_an_old_checkpoint_reshards_entry_by_entry(tmp_path, monkeypatch):
    """Every rank's window of the aligned layout at other world sizes, read from a checkpoint of the old
    packing, is that rank's shard of the aligned buffer (``io.reshard.read_flat_moved``)."""
    from zerostep.core.checkpointing import _moved_entries
    from zerostep.io import manifest
    from zerostep.io.reshard import read_flat_moved

    with monkeypatch.context() as m:
        m.setattr(manifest, "SHARD_ALIGN", 1)
        old = _engine(align=1)
        state = _run(old, old.init(), _batches(1))
        old.save(state, tmp_path, tag="old")
    values = old.full_params(state)
    new = _engine()
    with manifest.CheckpointDir.open(tmp_path, "old") as ckpt:
        moved = _moved_entries(new, ckpt.manifest["meta"])
        assert moved
        for g, layout in new.plan.layouts.items():
            for world_size in (2, 3, 5):
                lay = layout.with_world_size(world_size)
                full = lay.flatten({n: values[n] for n in lay.names})
                for r in range(world_size):
                    start, stop = lay.shard_range(r)
                    out = torch.full((stop - start,), float("nan"))
                    read_flat_moved(ckpt, f"master/{g}", moved.get(g, ()), start, stop, out, verify=True)
                    if g in moved:
                        assert torch.equal(out, lay.shard(full, r)), (g, world_size, r)


def _save_old_layout(rank: int, world_size: int, path: str) -> dict[str, torch.Tensor]:
    from zerostep.io import manifest

    manifest.SHARD_ALIGN = 1  # this process writes the old packing only
    engine = _engine(stage=2, world_size=world_size, align=1)
    state = _run(engine, engine.init(), _batches(2), rank, world_size)
    engine.save(state, path, tag="old")
    return engine.full_params(state)


def test_an_old_sharded_checkpoint_loads_at_another_world_size(tmp_path):
    """Saved by 2 ranks at stage 2 with the old packing, loaded by one aligned process."""
    want = spawn_ranks(_save_old_layout, 2, str(tmp_path), timeout=120)[0]
    engine = _engine()
    state = engine.load(tmp_path, tag="old")
    got = engine.full_params(state)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    _assert_padding_zero(engine, state)
