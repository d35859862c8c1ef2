"""Properties every optimizer shares: purity, in-place == pure, per-leaf options, grad_scale,
beta overrides, param copies, and a compiled in-place step that does not recompile per step."""

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import zerostep.optim as zo

FACTORIES = {
    "adam": lambda: zo.adam(lr=1e-2, weight_decay=0.1),
    "adamw": lambda: zo.adamw(lr=1e-2, weight_decay=0.1),
    "lamb": lambda: zo.lamb(lr=1e-2, weight_decay=0.1),
    "adagrad": lambda: zo.adagrad(lr=1e-1, lr_decay=0.01, weight_decay=0.1),
    "sgd": lambda: zo.sgd(lr=1e-1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "lion": lambda: zo.lion(lr=1e-3, weight_decay=0.1),
}


def tree(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=gen).to(dtype), "b": torch.randn(3, generator=gen).to(dtype),
            "nested": (torch.randn(5, generator=gen).to(dtype),)}


def tensors(x):
    import optree
    return optree.tree_leaves(x)


@pytest.mark.parametrize("name", FACTORIES)
@settings(max_examples=4)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_update_is_pure_and_equals_update_in_place(name, seed, dtype):
    opt = FACTORIES[name]()
    params, grads = tree(seed, dtype), tree(seed + 1, dtype)
    state = opt.init(params)
    state, params_ = opt.update(grads, state, params)[1], params  # one step so buffers are non-trivial
    inputs = (grads, state, params_)
    snapshot = [t.clone() for t in tensors(inputs)]
    versions = [t._version for t in tensors(inputs)]
    new_params, new_state = opt.update(grads, state, params_, 3e-2)
    assert [t._version for t in tensors(inputs)] == versions
    for before, after in zip(snapshot, tensors(inputs)):
        assert torch.equal(before, after)
    # update_ on copies gives bit-identical results.
    p_copy = zo.base.clone_tree(params_)
    s_copy = zo.base.clone_tree(state)
    assert opt.update_(grads, s_copy, p_copy, 3e-2) is None
    for a, b in zip(tensors((new_params, new_state)), tensors((p_copy, s_copy))):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("name", ["adam", "adamw", "lamb", "adagrad", "sgd", "lion"])
def test_grad_scale_multiplies_the_gradient(name):
    opt = FACTORIES[name]()
    params, grads = tree(0), tree(1)
    scaled = {k: (v[0] * 8,) if isinstance(v, tuple) else v * 8 for k, v in grads.items()}
    a, _ = opt.update(grads, opt.init(params), params)
    b = zo.base.clone_tree(params)
    state = opt.init(params)
    opt.update_(scaled, state, b, grad_scale=torch.tensor(0.125))
    for x, y in zip(tensors(a), tensors(b)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_weight_decay_mask_and_lr_multipliers_apply_per_leaf():
    params = {"w": torch.ones(3), "b": torch.ones(3)}
    zero = {"w": torch.zeros(3), "b": torch.zeros(3)}
    opt = zo.sgd(lr=0.1, weight_decay=0.5, weight_decay_mask={"w": True, "b": False},
                 lr_multipliers={"w": 1.0, "b": 2.0})
    p, _ = opt.update(zero, opt.init(params), params)
    torch.testing.assert_close(p["w"], torch.full((3,), 1 - 0.1 * 0.5))
    torch.testing.assert_close(p["b"], torch.ones(3))
    # A callable mask and tensor-valued leaves (a 0/1 mask over a flat shard).
    flat = {"flat": torch.ones(4)}
    opt = zo.adamw(lr=0.1, weight_decay=0.5,
                   weight_decay_mask=lambda ps: {"flat": torch.tensor([1.0, 1.0, 0.0, 0.0])})
    p, _ = opt.update({"flat": torch.zeros(4)}, opt.init(flat), flat)
    torch.testing.assert_close(p["flat"], torch.tensor([0.95, 0.95, 1.0, 1.0]))
    opt = zo.adam(lr=0.1, lr_multipliers={"flat": torch.tensor([1.0, 0.0, 1.0, 0.0])})
    p, _ = opt.update({"flat": torch.ones(4)}, opt.init(flat), flat)
    assert p["flat"][1] == 1.0 and p["flat"][0] < 1.0


def test_beta_overrides_change_the_first_moment():
    opt = zo.adam(lr=0.1)
    params, grads = tree(0), tree(1)
    _, s_default = opt.update(grads, opt.init(params), params)
    _, s_cycled = opt.update(grads, opt.init(params), params, beta1=torch.tensor(0.5), beta2=0.99)
    torch.testing.assert_close(s_cycled.exp_avg["w"], 0.5 * grads["w"])
    torch.testing.assert_close(s_cycled.exp_avg_sq["w"], 0.01 * grads["w"] ** 2)
    torch.testing.assert_close(s_default.exp_avg["w"], 0.1 * grads["w"])


def test_param_copies_receive_the_updated_params_in_low_precision():
    opt = zo.adamw(lr=1e-2)
    master, grads = tree(0), tree(1)
    copies = {k: (v[0].bfloat16(),) if isinstance(v, tuple) else v.bfloat16() for k, v in master.items()}
    state = opt.init(master)
    opt.update_(grads, state, master, param_copies=copies)
    for p, c in zip(tensors(master), tensors(copies)):
        assert c.dtype == torch.bfloat16 and torch.equal(c, p.bfloat16())


def test_state_is_fp32_with_a_0d_count():
    for name, make in FACTORIES.items():
        state = make().init(tree(0, torch.bfloat16))
        assert state.count.shape == () and state.count.dtype == torch.float32, name
        assert all(t.dtype == torch.float32 for t in tensors(state)), name


@pytest.mark.parametrize("name", FACTORIES)
def test_compiled_update_does_not_recompile_when_lr_and_scale_change(name):
    opt = FACTORIES[name]()
    params = {"a": torch.randn(64), "b": torch.randn(8)}
    state = opt.init(params)
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def step(grads, state, params, lr, scale):
        opt.update_(grads, state, params, lr, grad_scale=scale)

    torch._dynamo.reset()
    for i in range(4):
        grads = {"a": torch.randn(64), "b": torch.randn(8)}
        step(grads, state, params, torch.tensor(1e-3 * (i + 1)), torch.tensor(1.0 / (i + 1)))
    assert counter.frame_count == 1
    assert state.count.item() == 4


def test_inductor_compiled_in_place_adamw_equals_eager():
    opt = zo.adamw(lr=1e-2, weight_decay=0.1)
    params = {"flat": torch.randn(1000)}
    eager_p, eager_s = zo.base.clone_tree(params), opt.init(params)
    comp_p, comp_s = zo.base.clone_tree(params), opt.init(params)
    step = torch.compile(lambda g, s, p, lr, c: opt.update_(g, s, p, lr, grad_scale=c), fullgraph=True)
    for i in range(3):
        grads = {"flat": torch.randn(1000)}
        lr, scale = torch.tensor(1e-2 / (i + 1)), torch.tensor(0.5)
        opt.update_(grads, eager_s, eager_p, lr, grad_scale=scale)
        step(grads, comp_s, comp_p, lr, scale)
    torch.testing.assert_close(comp_p["flat"], eager_p["flat"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(comp_s.exp_avg_sq["flat"], eager_s.exp_avg_sq["flat"], rtol=1e-6, atol=1e-9)
