"""from_torch_optimizer: any torch.optim class (or instance) over pytrees and flat shards equals the torch
optimizer itself; sharded pieces of elementwise optimizers equal the unsharded run; state structure,
compiled path, param groups, config names and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import zerostep.optim as zo
from zerostep.errors import ConfigError
from zerostep.optim.torch_adapter import from_torch_optimizer, torch_param_hyperparams
from zerostep.parallel.flat import FlatLayout

ELEMENTWISE = {
    "RMSprop": [{}, {"momentum": 0.9, "centered": True, "weight_decay": 0.1}],
    "NAdam": [{}, {"weight_decay": 0.1, "decoupled_weight_decay": True}],
    "RAdam": [{}, {"weight_decay": 0.1}],
    "Adamax": [{}, {"weight_decay": 0.1}],
    "ASGD": [{}, {"t0": 2, "weight_decay": 0.1}],
    "Adadelta": [{}, {"weight_decay": 0.1}],
    "Rprop": [{}, {"etas": (0.4, 1.3)}],
    "Adagrad": [{"lr_decay": 0.01}],
    "Adam": [{"amsgrad": True}],
}
CASES = [(name, hp) for name, hps in ELEMENTWISE.items() for hp in hps]
SHAPES = st.lists(st.sampled_from([(3,), (2, 5), (4, 1, 3), (1,)]), min_size=1, max_size=3)


def torch_run(cls, hp, params, grads_seq):
    ref = [p.clone().requires_grad_() for p in params]
    opt = cls(ref, **hp)
    for grads in grads_seq:
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
    return [r.detach() for r in ref]


@given(
    case=st.sampled_from(CASES), shapes=SHAPES, seed=st.integers(0, 2**16), lr=st.sampled_from([1e-2, 3e-3])
)
def test_pytree_equals_the_torch_optimizer(case, shapes, seed, lr):
    name, hp = case
    cls = getattr(torch.optim, name)
    hp = {**hp, "lr": lr}
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(*s, generator=gen) for s in shapes]
    grads_seq = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(4)]
    want = torch_run(cls, hp, params, grads_seq)
    opt = from_torch_optimizer(cls, hp)
    tree = {f"p{i}": p.clone() for i, p in enumerate(params)}
    state = opt.init(tree)
    for grads in grads_seq:
        opt.update_({f"p{i}": g for i, g in enumerate(grads)}, state, tree)
    for i, w in enumerate(want):
        assert torch.equal(tree[f"p{i}"], w), (name, i)


def shards(entries, world_size):
    """A flat layout of ``entries`` and, per rank, its FlatPieces (sharded like ZeRO stages 1-3)."""
    lay = FlatLayout.build(entries, torch.float32, world_size)
    out = []
    for r in range(world_size):
        lo, hi = lay.shard_range(r)
        out.append(zo.layout_pieces(lay.entries, lo, hi, sharded=world_size > 1, full_numel=lay.padded_numel))
    return lay, out


@given(case=st.sampled_from(CASES), world_size=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_sharded_flat_leaves_equal_the_unsharded_torch_optimizer(case, world_size, seed):
    name, hp = case
    cls = getattr(torch.optim, name)
    entries = [("a.weight", (3, 4)), ("a.bias", (3,)), ("b.weight", (2, 3))]
    lay, pieces = shards(entries, world_size)
    gen = torch.Generator().manual_seed(seed)
    tree = {n: torch.randn(*s, generator=gen) for n, s in entries}
    grads_seq = [{n: torch.randn(*s, generator=gen) for n, s in entries} for _ in range(3)]
    want = torch_run(cls, hp, list(tree.values()), [list(g.values()) for g in grads_seq])
    full = lay.flatten(tree)
    ranks = []
    for r in range(world_size):
        opt = from_torch_optimizer(cls, hp, param_pieces={"unit": pieces[r]})
        master = {"unit": lay.shard(full, r).clone()}
        ranks.append((opt, master, opt.init(master)))
    for grads in grads_seq:
        g_full = lay.flatten(grads)
        for r, (opt, master, state) in enumerate(ranks):
            opt.update_({"unit": lay.shard(g_full, r)}, state, master)
    got = lay.unflatten(torch.cat([m["unit"] for _, m, _ in ranks]))
    for (n, _), w in zip(entries, want):
        assert torch.allclose(got[n], w, atol=1e-7), (name, n)
    # state leaves shaped like the shard: what the checkpoint reshards
    state = ranks[0][2]
    assert state.tensors and all(t["unit"].shape == ranks[0][1]["unit"].shape for t in state.tensors.values())


def test_state_structure_and_first_step_initialization():
    opt = from_torch_optimizer(torch.optim.Rprop, {"lr": 0.1})
    params = {"w": torch.ones(3)}
    state = opt.init(params)
    assert set(state.tensors) == {"prev", "step_size"} and set(state.scalars) == {"step"}
    assert int(state.initialized) == 0 and torch.equal(state.tensors["step_size"]["w"], torch.zeros(3))
    opt.update_({"w": torch.ones(3)}, state, params, lr=0.05)  # torch initializes step_size from this lr
    assert int(state.initialized) == 1 and float(state.scalars["step"]["w"]) == 1.0
    ref = torch.ones(3).requires_grad_()
    torch_opt = torch.optim.Rprop([ref], lr=0.05)
    ref.grad = torch.ones(3)
    torch_opt.step()
    assert torch.equal(params["w"], ref.detach())
    assert torch.equal(state.tensors["step_size"]["w"], torch_opt.state[ref]["step_size"])


def test_adafactor_sees_whole_matrices_when_unsharded():
    gen = torch.Generator().manual_seed(0)
    tree = {"w": torch.randn(4, 6, generator=gen), "b": torch.randn(6, generator=gen)}
    grads_seq = [{k: torch.randn(v.shape, generator=gen) for k, v in tree.items()} for _ in range(3)]
    want = torch_run(torch.optim.Adafactor, {}, list(tree.values()), [list(g.values()) for g in grads_seq])
    opt = from_torch_optimizer(torch.optim.Adafactor)
    state = opt.init(tree)
    assert set(state.others) == {"row_var", "col_var"}  # factored: per piece, not shaped like the param
    for grads in grads_seq:
        opt.update_(grads, state, tree)
    assert torch.equal(tree["w"], want[0]) and torch.equal(tree["b"], want[1])


def test_compiled_update_equals_eager_and_writes_param_copies():
    gen = torch.Generator().manual_seed(1)
    p = {"w": torch.randn(64, generator=gen)}
    eager, compiled = {"w": p["w"].clone()}, {"w": p["w"].clone()}
    copies = {"w": torch.zeros(64, dtype=torch.bfloat16)}
    opt = from_torch_optimizer(torch.optim.NAdam, {"lr": 1e-2, "weight_decay": 0.1})
    se, sc = opt.init(eager), opt.init(compiled)

    def step(g, s, params, lr, scale):
        opt.update_(g, s, params, lr, grad_scale=scale, param_copies=copies)

    compiled_step = torch.compile(step, fullgraph=True, dynamic=False)
    for _ in range(3):
        g = {"w": torch.randn(64, generator=gen)}
        opt.update_(g, se, eager, torch.tensor(1e-2), grad_scale=torch.tensor(0.5))
        compiled_step(g, sc, compiled, torch.tensor(1e-2), torch.tensor(0.5))
    assert torch.equal(eager["w"], compiled["w"])
    assert torch.equal(copies["w"], compiled["w"].bfloat16())


def test_an_instance_with_param_groups():
    model = torch.nn.Linear(3, 2)
    named = dict(model.named_parameters())
    client = torch.optim.RMSprop(
        [{"params": [model.weight]}, {"params": [model.bias], "lr": 5e-3, "weight_decay": 0.0}],
        lr=1e-2,
        weight_decay=0.1,
    )
    opt = from_torch_optimizer(client, param_hyperparams=torch_param_hyperparams(client, named))
    assert opt.lr == 1e-2 and opt.name == "rmsprop"
    params = {n: p.detach().clone() for n, p in named.items()}
    state = opt.init(params)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in named.items()}
        opt.update_(grads, state, params)
        for n, p in named.items():
            p.grad = grads[n].clone()
        client.step()
    for n, p in named.items():
        assert torch.equal(params[n], p.detach()), n


def test_lr_and_weight_decay_factors_per_parameter():
    # the engine's param groups: per-element factor vectors, constant over each parameter
    entries = [("w", (2, 3)), ("b", (3,))]
    lay, (pieces,) = shards(entries, 1)
    lr_f = lay.flatten({"w": torch.full((2, 3), 1.0), "b": torch.full((3,), 0.5)})
    wd_f = lay.flatten({"w": torch.full((2, 3), 1.0), "b": torch.zeros(3)})
    opt = from_torch_optimizer(
        torch.optim.Adamax,
        {"lr": 1e-2, "weight_decay": 0.1},
        param_pieces={"u": pieces},
        lr_multipliers={"u": lr_f},
        weight_decay_mask={"u": wd_f},
    )
    gen = torch.Generator().manual_seed(3)
    tree = {n: torch.randn(*s, generator=gen) for n, s in entries}
    master = {"u": lay.flatten(tree)}
    state = opt.init(master)
    ref = {n: t.clone().requires_grad_() for n, t in tree.items()}
    torch_opt = torch.optim.Adamax(
        [{"params": [ref["w"]]}, {"params": [ref["b"]], "lr": 5e-3, "weight_decay": 0.0}],
        lr=1e-2,
        weight_decay=0.1,
    )
    for _ in range(3):
        grads = {n: torch.randn(*s, generator=gen) for n, s in entries}
        opt.update_({"u": lay.flatten(grads)}, state, master)
        for n in ref:
            ref[n].grad = grads[n].clone()
        torch_opt.step()
    for n, view in lay.unflatten(master["u"]).items():
        assert torch.equal(view, ref[n].detach()), n


def test_config_names_any_torch_optim_class():
    assert {"rmsprop", "nadam", "radam", "adamax", "asgd", "adadelta", "rprop"} <= set(zo.OPTIMIZER_TYPES)
    opt = zo.from_config({"type": "RMSprop", "params": {"lr": 1e-3, "alpha": 0.9}})
    assert opt.name == "rmsprop" and opt.lr == 1e-3 and not opt.cycles_momentum
    assert zo.from_config({"type": "nadam", "params": {"betas": [0.8, 0.99]}}).cycles_momentum
    assert zo.from_config({"type": "ASGD"}).lr == 0.01  # torch's default


@pytest.mark.parametrize(
    "block, match",
    [
        ({"type": "RMSprop", "params": {"alhpa": 0.9}}, r"unknown key\(s\) \['alhpa'\].*'alpha'"),
        ({"type": "RMSprop", "params": {"lr": -1.0}}, "rejected its parameters"),
        ({"type": "LBFGS"}, "closure"),
        ({"type": "SparseAdam"}, "sparse gradients"),
        ({"type": "RMSprop", "params": {"differentiable": True}}, "without autograd"),
    ],
)
def test_bad_config(block, match):
    with pytest.raises(ConfigError, match=match):
        zo.from_config(block)


def test_unknown_torch_name_lists_close_ones():
    with pytest.raises(ConfigError, match="did you mean RMSprop"):
        zo.torch_optimizer_class("RMSpropp")


class PerTensorNorm(torch.optim.Optimizer):
    """A custom optimizer whose state is not shaped like its parameter (a per-row norm)."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["row_norm"] = torch.zeros(p.shape[:1] + (1,) * (p.dim() - 1) + (2,))
                p.sub_(p.grad, alpha=group["lr"])


def test_state_not_shaped_like_the_param_cannot_be_sharded():
    entries = [("w", (2, 3))]
    _, pieces = shards(entries, 2)
    opt = from_torch_optimizer(PerTensorNorm, param_pieces={"u": pieces[0]})
    with pytest.raises(ConfigError, match="cannot be sharded"):
        opt.init({"u": torch.zeros(3)})


@pytest.mark.parametrize(
    "kind, why", [("LBFGS", "needs a closure"), ("sparseadam", "needs sparse gradients")]
)
def test_config_parser_names_why_a_torch_class_cannot_run(kind, why):
    from zerostep.core import Config

    with pytest.raises(ConfigError, match=rf"torch\.optim\.\w+ cannot run in zerostep: it {why}"):
        Config.from_dict({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": kind}})
