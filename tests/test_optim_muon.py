"""Muon (DeepSpeed's MuonWithAuxAdam): against torch.optim.Muon and an fp64 reference of DeepSpeed's
semantics, over pytrees and flat leaves with pieces, config mapping, bad input, and ZeRO stages 0-3 on
2 gloo ranks equal to one process."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import zerostep.optim as zo
from zerostep.errors import ConfigError
from zerostep.optim.muon import matrix_shape, unit_matrices, update_scale, uses_muon
from zerostep.optim.muon_shards import holders, owner_plan
from zerostep.optim.newton_schulz import newton_schulz

# ------------------------------------------------------------------ an independent fp64 reference


def ns_reference(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Jordan et al.'s quintic Newton-Schulz, one matrix at a time, in fp64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        r = x @ x.T
        x = a * x + (b * r + c * r @ r) @ x
    return x.T if tall else x


def deepspeed_reference(params, grads_seq, lr, adam_lr, momentum, wd, betas, eps, nesterov=True):
    """DeepSpeed's SingleDeviceMuonWithAuxAdam step, written out per parameter in fp64."""
    p = {k: v.double().clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        for k in p:
            g = grads[k].double()
            if uses_muon(k, tuple(p[k].shape)):
                m[k] = m[k] + (1 - momentum) * (g - m[k])
                u = g + momentum * (m[k] - g) if nesterov else m[k]
                shape = tuple(p[k].shape)
                mats = (
                    u.reshape(-1, *matrix_shape(shape)[-2:])
                    if len(shape) != 4
                    else u.reshape(1, shape[0], -1)
                )
                o = torch.stack([ns_reference(x) for x in mats]).reshape(shape)
                p[k] = p[k] * (1 - lr * wd) - lr * update_scale(shape, "original") * o
            else:
                b1, b2 = betas
                m[k] = m[k] + (1 - b1) * (g - m[k])
                v2[k] = v2[k] + (1 - b2) * (g * g - v2[k])
                upd = (m[k] / (1 - b1**t)) / ((v2[k] / (1 - b2**t)).sqrt() + eps)
                p[k] = p[k] * (1 - adam_lr * wd) - adam_lr * upd
    return p


SHAPES = st.sampled_from([(4, 6), (6, 4), (5, 5), (3, 2, 5), (4, 2, 2, 3), (7,), (1, 9)])


@given(
    shapes=st.lists(SHAPES, min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    momentum=st.floats(0.5, 0.99),
    wd=st.sampled_from([0.0, 0.1]),
    nesterov=st.booleans(),
    method=st.sampled_from(["gram", "standard"]),
)
def test_muon_matches_deepspeed_semantics(shapes, seed, momentum, wd, nesterov, method):
    gen = torch.Generator().manual_seed(seed)
    params = {f"layer{i}.weight": torch.randn(*s, generator=gen) for i, s in enumerate(shapes)}
    params["hidden.weight"] = torch.randn(3, 4, generator=gen)  # at least one Muon matrix
    params["embed.weight"] = torch.randn(5, 3, generator=gen)  # 2-D but an embedding: AdamW
    params["bias"] = torch.randn(4, generator=gen)
    grads_seq = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(4)]
    want = deepspeed_reference(params, grads_seq, 0.03, 1e-2, momentum, wd, (0.9, 0.95), 1e-10, nesterov)
    opt = zo.muon(
        lr=0.03,
        adam_lr=1e-2,
        momentum=momentum,
        weight_decay=wd,
        nesterov=nesterov,
        ns_method=method,
        ns_dtype="float32",
    )
    state = opt.init(params)
    for grads in grads_seq:
        params, state = opt.update(grads, state, params)
    for k in params:
        assert torch.allclose(params[k].double(), want[k], rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (8, 8)])
def test_muon_equals_torch_optim_muon(shape):
    # torch.optim.Muon works in bf16 with the standard iteration: so does ns_dtype="bfloat16"
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(*shape, generator=gen)}
    ref = params["w"].clone().requires_grad_()
    torch_muon = torch.optim.Muon([ref], lr=0.05, weight_decay=0.1, momentum=0.9)
    opt = zo.muon(lr=0.05, weight_decay=0.1, momentum=0.9, ns_method="standard", ns_dtype="bfloat16")
    state = opt.init(params)
    for _ in range(8):
        g = torch.randn(*shape, generator=gen)
        opt.update_({"w": g}, state, params)
        ref.grad = g.clone()
        torch_muon.step()
    assert torch.allclose(params["w"], ref.detach(), atol=1e-6)


def test_moonlight_scaling_matches_torch():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, generator=gen)
    ref = w.clone().requires_grad_()
    torch_muon = torch.optim.Muon([ref], lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    opt = zo.muon(lr=0.02, ns_method="standard", ns_dtype="bfloat16", adjust_lr_fn="match_rms_adamw")
    params = {"w": w}
    state = opt.init(params)
    for _ in range(3):
        g = torch.randn(6, 4, generator=gen)
        opt.update_({"w": g}, state, params)
        ref.grad = g.clone()
        torch_muon.step()
    assert update_scale((6, 4), "match_rms_adamw") == pytest.approx(0.2 * math.sqrt(6))
    assert torch.allclose(params["w"], ref.detach(), atol=1e-6)


def test_gram_and_standard_iterations_agree():
    gen = torch.Generator().manual_seed(2)
    for shape in [(5, 20), (20, 5), (3, 4, 12)]:
        g = torch.randn(*shape, generator=gen, dtype=torch.float64)
        assert torch.allclose(newton_schulz(g, 5, "gram"), newton_schulz(g, 5, "standard"), atol=1e-12)


def flat_pieces(entries):
    """A one-process flat layout of ``entries`` and the pieces of its whole buffer."""
    from zerostep.parallel.flat import FlatLayout

    lay = FlatLayout.build(entries, torch.float32)
    n = lay.padded_numel
    return lay, zo.layout_pieces(lay.entries, 0, n, sharded=False, full_numel=n)


def test_flat_leaf_with_pieces_equals_the_pytree():
    entries = [("a.weight", (4, 6)), ("a.bias", (4,)), ("embed.weight", (3, 2)), ("b.weight", (4, 6))]
    lay, pieces = flat_pieces(entries)
    gen = torch.Generator().manual_seed(3)
    tree = {n: torch.randn(*s, generator=gen) for n, s in entries}
    flat = {"unit": lay.flatten(tree)}
    opt_tree = zo.muon(lr=0.02, weight_decay=0.1, ns_dtype="float32")
    opt_flat = zo.muon(lr=0.02, weight_decay=0.1, ns_dtype="float32", param_pieces={"unit": pieces})
    s_tree, s_flat = opt_tree.init(tree), opt_flat.init(flat)
    for _ in range(3):
        grads = {n: torch.randn(*s, generator=gen) for n, s in entries}
        opt_tree.update_(grads, s_tree, tree)
        opt_flat.update_({"unit": lay.flatten(grads)}, s_flat, flat)
    for n, view in lay.unflatten(flat["unit"]).items():
        assert torch.allclose(view, tree[n], atol=1e-6), n


def test_bf16_params_keep_fp32_state_and_round_once():
    gen = torch.Generator().manual_seed(4)
    w32 = torch.randn(4, 6, generator=gen).bfloat16().float()
    g = torch.randn(4, 6, generator=gen)
    opt = zo.muon(lr=0.02, ns_dtype="float32")
    p16 = {"w": w32.bfloat16()}
    s16 = opt.init(p16)
    assert s16.exp_avg["w"].dtype == torch.float32
    new16, _ = opt.update({"w": g}, s16, p16)
    new32, _ = opt.update({"w": g}, opt.init({"w": w32}), {"w": w32})
    assert torch.equal(new16["w"], new32["w"].bfloat16())


def test_compiled_update_equals_eager():
    entries = [("a.weight", (4, 6)), ("a.bias", (4,))]
    lay, pieces = flat_pieces(entries)
    gen = torch.Generator().manual_seed(5)
    flat = lay.flatten({n: torch.randn(*s, generator=gen) for n, s in entries})
    opt = zo.muon(lr=0.02, ns_dtype="float32", param_pieces={"u": pieces})
    eager, compiled = {"u": flat.clone()}, {"u": flat.clone()}
    se, sc = opt.init(eager), opt.init(compiled)
    step = torch.compile(
        lambda g, s, p, lr: opt.update_(g, s, p, lr, grad_scale=torch.tensor(0.5)),
        fullgraph=True,
        dynamic=False,
    )
    for _ in range(2):
        g = {"u": torch.randn(lay.padded_numel, generator=gen)}
        opt.update_(g, se, eager, torch.tensor(0.02), grad_scale=torch.tensor(0.5))
        step(g, sc, compiled, torch.tensor(0.02))
    assert torch.allclose(eager["u"], compiled["u"], atol=1e-6)


# ------------------------------------------------------------------ config


def test_config_maps_deepspeeds_keys():
    opt = zo.from_config({"type": "Muon", "params": {"lr": 1e-3}})
    assert opt.name == "muon" and opt.lr == 1e-3 and opt.hyperparams["adam_lr"] == 1e-3  # lr reaches both
    opt = zo.from_config({"type": "muon", "params": {"lr": 1e-3, "muon_lr": 0.05, "adam_lr": 2e-4}})
    assert opt.lr == 0.05 and opt.hyperparams["adam_lr"] == 2e-4
    opt = zo.from_config({"type": "MUON"})
    assert opt.lr == 0.02 and opt.hyperparams["adam_lr"] == 3e-4 and opt.hyperparams["betas"] == (0.9, 0.95)
    assert not opt.cycles_momentum


def test_scheduled_lr_reaches_both_groups_and_ratio_otherwise():
    params = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    grads = {"w": torch.zeros(4, 4), "b": torch.ones(4)}
    for scheduled, adam_lr_seen in ((False, 0.5e-2), (True, 1e-2)):
        opt = zo.muon(lr=0.02, adam_lr=1e-2, schedule_sets_lr=scheduled, ns_dtype="float32")
        new, _ = opt.update(grads, opt.init(params), params, lr=0.01)
        # Adam's first step moves each element by lr (m_hat / sqrt(v_hat) = 1)
        assert torch.allclose(new["b"], torch.full((4,), -adam_lr_seen), rtol=1e-5)


@pytest.mark.parametrize(
    "block, match",
    [
        ({"type": "Muon", "params": {"nesterov_momentum": 0.9}}, "unknown key"),
        ({"type": "Muon", "params": {"ns_method": "svd"}}, "ns_method"),
        ({"type": "Muon", "params": {"momentum": 1.5}}, "momentum"),
        ({"type": "Muon", "params": {"ns_steps": 0}}, "ns_steps"),
        ({"type": "Muon", "params": {"ns_dtype": "float8"}}, "ns_dtype"),
        ({"type": "Muon", "params": {"distributed": "ring"}}, "distributed"),
    ],
)
def test_bad_config(block, match):
    with pytest.raises(ConfigError, match=match):
        zo.from_config(block)


def test_a_model_without_matrices_is_an_error():
    opt = zo.muon()
    with pytest.raises(ConfigError, match="at least one parameter with 2 or more dimensions"):
        opt.init({"embed.weight": torch.zeros(3, 4), "bias": torch.zeros(4)})


# ------------------------------------------------------------------ ZeRO stages on 2 gloo ranks

MUON = {"type": "Muon", "params": {"lr": 0.02, "adam_lr": 0.01, "weight_decay": 0.01, "ns_dtype": "float32"}}
RMSPROP = {"type": "RMSprop", "params": {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.01}}


def save_after_two_steps(rank: int, world_size: int, block: dict, save_dir: str) -> None:
    from models import Net, mse
    from test_zero import GAS, MB, global_batches, make_config

    from zerostep.core import initialize

    engine = initialize(Net(), make_config(2, world_size, optimizer=block), loss_fn=mse, compile=False)
    state = engine.init()
    per = MB * GAS
    for x, y in global_batches(world_size)[:2]:
        state = engine.step(state, (x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]))
    engine.save(state, save_dir, tag="two", fsync=False)


MUON_ALLGATHER = {"type": "Muon", "params": {**MUON["params"], "distributed": "allgather"}}
# Muon's two distributed strategies at every stage; RMSprop is elementwise: the sharded stages suffice
STAGES = {"muon": (0, 1, 2, 3), "muon_allgather": (0, 1, 2, 3), "rmsprop": (1, 3)}
BLOCKS = {"muon": MUON, "muon_allgather": MUON_ALLGATHER, "rmsprop": RMSPROP}
SAVED = ("muon", "rmsprop")  # checkpoints do not depend on the strategy


def stages_then_save(rank: int, world_size: int, save_dir: str) -> dict:
    from test_zero import all_stages

    out = {}
    for name, block in BLOCKS.items():
        out[name] = all_stages(rank, world_size, False, STAGES[name], False, block)
        if name in SAVED:
            save_after_two_steps(rank, world_size, block, f"{save_dir}/{name}")
    return out


def test_two_ranks_equal_one_process_and_checkpoints_reshard_to_one(tmp_path):
    """Muon (both strategies for matrices cut by shard boundaries) and RMSprop (elementwise) on 2 gloo
    ranks equal one process at every stage; a stage-2 checkpoint of 2 ranks loads in one process,
    master and every optimizer leaf equal to a one-process run of the same two steps."""
    import optree
    from models import Net, mse
    from test_zero import GAS, MB, check_equal, global_batches, make_config

    from zerostep.core import initialize
    from zerostep.parallel.launch import spawn_ranks

    results = spawn_ranks(stages_then_save, 2, str(tmp_path), timeout=300)
    for name, block in BLOCKS.items():
        check_equal([r[name] for r in results], 2, STAGES[name], block)
        if name not in SAVED:
            continue
        engine = initialize(Net(), make_config(0, 1, mb=MB * 2, optimizer=block), loss_fn=mse, compile=False)
        state = engine.init()
        for x, y in global_batches(2)[:2]:
            rows = [
                torch.arange(r * MB * GAS + i * MB, r * MB * GAS + (i + 1) * MB)
                for i in range(GAS)
                for r in range(2)
            ]
            idx = torch.cat(rows)
            state = engine.step(state, (x[idx], y[idx]))
        # a second engine: loading binds the model's parameters to the loaded state
        other = initialize(Net(), make_config(0, 1, mb=MB * 2, optimizer=block), loss_fn=mse, compile=False)
        loaded = other.load(tmp_path / name, tag="two")
        pairs = [*zip(optree.tree_leaves(loaded.opt_state), optree.tree_leaves(state.opt_state))]
        pairs += [(loaded.master[g], state.master[g]) for g in state.master]
        for a, b in pairs:  # relative to the leaf's largest value, as check_equal
            err = float((a.float() - b.float()).abs().max())
            assert err <= 1e-5 * max(float(b.float().abs().max()), 1e-12), name


# ------------------------------------------------------------------ ZeRO shards, simulated in threads


class ThreadRanks:
    """``world_size`` ranks as threads of this process: an all-to-all and an all-gather over a mailbox."""

    def __init__(self, world_size: int):
        import threading

        self.n, self.box = world_size, [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.moved = [[0, 0] for _ in range(world_size)]  # per rank: [elements counted, collectives]

    def exchange(self, rank: int):
        def all_to_all(send, send_splits, recv_splits):
            self.moved[rank][0] += send.numel()  # all-to-all: the elements this rank sends
            self.moved[rank][1] += 1
            self.box[rank] = send.split(send_splits)
            self.barrier.wait()
            out = torch.cat([self.box[q][rank] for q in range(self.n)])
            self.barrier.wait()  # nobody refills the mailbox before every rank has read it
            assert out.numel() == sum(recv_splits)
            return out

        return all_to_all

    def all_gather(self, rank: int):
        def gather(shard):
            self.box[rank] = shard
            self.barrier.wait()
            out = torch.cat(list(self.box))
            self.barrier.wait()
            self.moved[rank][0] += out.numel()  # all-gather: the gathered buffer
            self.moved[rank][1] += 1
            return out

        return gather

    def run(self, fn):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.n) as pool:
            return [f.result(timeout=60) for f in [pool.submit(fn, r) for r in range(self.n)]]


@pytest.mark.parametrize("strategy", ["owner", "allgather"])
@pytest.mark.parametrize("world_size", [3, 4])
def test_sharded_strategies_equal_one_process(strategy, world_size):
    """Both strategies on 3-4 simulated ranks, matrices cut across up to three shards, equal the
    unsharded flat update; the owner strategy orthogonalizes each matrix once, on one rank, and
    step_comm_plan counts the bytes and collectives each rank's update moved."""
    from zerostep.core.accounting import step_comm_plan
    from zerostep.core.step import StepPlan
    from zerostep.parallel.flat import FlatLayout

    # b.weight spans three shards at 4 ranks, with or without aligned entry offsets
    entries = [("a.weight", (6, 5)), ("a.bias", (6,)), ("embed.weight", (3, 2)), ("b.weight", (4, 6, 4))]
    entries += [("c.weight", (3, 5)), ("d.weight", (2, 2))]
    lay = FlatLayout.build(entries, torch.float32, world_size=world_size)
    gen = torch.Generator().manual_seed(6)
    full = lay.flatten({n: torch.randn(*s, generator=gen) for n, s in entries})
    grads = [lay.flatten({n: torch.randn(*s, generator=gen) for n, s in entries}) for _ in range(3)]
    hyper = dict(lr=0.02, weight_decay=0.1, ns_dtype="float32")
    one = {"u": full.clone()}
    opt = zo.muon(
        **hyper,
        param_pieces={
            "u": zo.layout_pieces(
                lay.entries, 0, lay.padded_numel, sharded=False, full_numel=lay.padded_numel
            )
        },
    )
    state = opt.init(one)
    for g in grads:
        opt.update_({"u": g}, state, one)
    ranks = ThreadRanks(world_size)

    def rank_run(r):
        lo, hi = lay.shard_range(r)
        pieces = zo.layout_pieces(lay.entries, lo, hi, sharded=True, full_numel=lay.padded_numel)
        o = zo.muon(
            **hyper,
            param_pieces={"u": pieces},
            distributed=strategy,
            exchange=ranks.exchange(r),
            all_gather=ranks.all_gather(r),
        )
        mine = {"u": full[lo:hi].clone()}
        s = o.init(mine)
        for g in grads:
            o.update_({"u": g[lo:hi]}, s, mine)
        return mine["u"]

    got = torch.cat(ranks.run(rank_run))
    assert torch.allclose(got, one["u"], rtol=1e-5, atol=1e-6)
    pieces = zo.layout_pieces(lay.entries, 0, lay.shard_numel, sharded=True, full_numel=lay.padded_numel)
    matrices = unit_matrices(pieces, "original")
    owned = [owner_plan(matrices, r, lay.shard_numel, world_size).owned for r in range(world_size)]
    assert sorted(m for o in owned for m in o) == sorted(matrices)  # each matrix on exactly one rank
    spans = max(len(holders(m, lay.shard_numel)) for m in matrices)
    assert spans >= 2 and (world_size != 4 or spans == 3)
    opt = zo.muon(distributed=strategy)
    for r in range(world_size):
        plan = StepPlan({"u": lay}, 1, world_size, r, 1, 1, torch.float32, 0.0, 1.0, None, None)
        base, full = step_comm_plan(plan), step_comm_plan(plan, optimizer=opt)
        per_step = [(full.total_bytes - base.total_bytes) // 4, full.calls - base.calls]  # fp32 elements
        assert ranks.moved[r] == [n * len(grads) for n in per_step] and per_step[1] > 0, r
