"""Adam, AdamW, Adagrad and SGD against torch.optim over 100 steps on random pytrees.

fp32 params must match torch.optim to 1e-6 relative. bf16 params (fp32 state, fp32 math) are
compared with torch.optim run on fp32 copies that are rounded to bf16 after every step, which is
exactly what mixed precision with fp32 optimizer state computes; the tolerance allows the odd
one-ulp bf16 rounding difference.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zerostep.optim as zo

STEPS = 100
shapes = st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=2).map(tuple), min_size=1, max_size=3)


def random_tree(shape_list, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=gen).to(dtype) for i, s in enumerate(shape_list)}


def run_against_torch(opt, torch_cls, torch_kwargs, shape_list, seed, dtype=torch.float32):
    params = random_tree(shape_list, seed, dtype)
    ref = {k: torch.nn.Parameter(v.float().clone()) for k, v in params.items()}
    torch_opt = torch_cls(list(ref.values()), **torch_kwargs)
    state = opt.init(params)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(STEPS):
        grads = {k: torch.randn(v.shape, generator=gen).to(dtype) for k, v in params.items()}
        params, state = opt.update(grads, state, params)
        for k, p in ref.items():
            p.grad = grads[k].float()
        torch_opt.step()
        if dtype != torch.float32:
            with torch.no_grad():
                for p in ref.values():
                    p.copy_(p.to(dtype).float())
    return params, ref


def assert_matches(params, ref, dtype=torch.float32):
    for k, p in params.items():
        assert p.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(p, ref[k].detach(), rtol=1e-6, atol=1e-7)
        else:
            torch.testing.assert_close(p.float(), ref[k].detach(), rtol=2e-2, atol=1e-3)


adam_hyper = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-3, 1e-2]),
    "betas": st.tuples(st.sampled_from([0.8, 0.9]), st.sampled_from([0.99, 0.999])),
    "eps": st.sampled_from([1e-8, 1e-6]),
    "weight_decay": st.sampled_from([0.0, 0.01, 0.1]),
})


@settings(max_examples=8)
@given(shapes, st.integers(0, 2**16), adam_hyper, st.booleans())
def test_adam_and_adamw_match_torch(shape_list, seed, hyper, decoupled):
    opt = zo.adamw(**hyper) if decoupled else zo.adam(**hyper)
    torch_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    params, ref = run_against_torch(opt, torch_cls, hyper, shape_list, seed)
    assert_matches(params, ref)


@settings(max_examples=8)
@given(shapes, st.integers(0, 2**16), st.fixed_dictionaries({
    "lr": st.sampled_from([1e-2, 1e-1]),
    "lr_decay": st.sampled_from([0.0, 1e-2]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "initial_accumulator_value": st.sampled_from([0.0, 0.5]),
    "eps": st.sampled_from([1e-10, 1e-6]),
}))
def test_adagrad_matches_torch(shape_list, seed, hyper):
    params, ref = run_against_torch(zo.adagrad(**hyper), torch.optim.Adagrad, hyper, shape_list, seed)
    assert_matches(params, ref)


sgd_hyper = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-3, 1e-2]),
    "momentum": st.sampled_from([0.0, 0.5, 0.9]),
    "dampening": st.sampled_from([0.0, 0.1]),
    "weight_decay": st.sampled_from([0.0, 0.01]),
    "nesterov": st.booleans(),
}).filter(lambda h: not h["nesterov"] or (h["momentum"] > 0 and h["dampening"] == 0))


@settings(max_examples=10)
@given(shapes, st.integers(0, 2**16), sgd_hyper)
def test_sgd_matches_torch(shape_list, seed, hyper):
    params, ref = run_against_torch(zo.sgd(**hyper), torch.optim.SGD, hyper, shape_list, seed)
    assert_matches(params, ref)


@pytest.mark.parametrize("name", ["adam", "adamw", "adagrad", "sgd"])
@settings(max_examples=3)
@given(shape_list=shapes, seed=st.integers(0, 2**16))
def test_bf16_params_with_fp32_state_match_torch_on_fp32_copies(name, shape_list, seed):
    hyper = {
        "adam": (zo.adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
        "adamw": (zo.adamw, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
        "adagrad": (zo.adagrad, torch.optim.Adagrad, dict(lr=1e-1, weight_decay=0.1)),
        "sgd": (zo.sgd, torch.optim.SGD, dict(lr=1e-1, momentum=0.9, weight_decay=0.01)),
    }[name]
    factory, torch_cls, kwargs = hyper
    opt = factory(**kwargs)
    state = opt.init(random_tree(shape_list, seed, torch.bfloat16))
    for leaf in state:
        for t in (leaf.values() if isinstance(leaf, dict) else [leaf]):
            assert t.dtype == torch.float32
    params, ref = run_against_torch(opt, torch_cls, kwargs, shape_list, seed, torch.bfloat16)
    assert_matches(params, ref, torch.bfloat16)


def test_sgd_first_step_initialises_the_buffer_to_the_gradient():
    # torch: buf = grad on step 1 (no dampening), then buf = m * buf + (1 - d) * grad.
    opt = zo.sgd(lr=1.0, momentum=0.5, dampening=0.5)
    p = {"w": torch.zeros(2)}
    g = {"w": torch.tensor([1.0, -2.0])}
    p1, s1 = opt.update(g, opt.init(p), p)
    torch.testing.assert_close(s1.momentum_buffer["w"], g["w"])
    p2, s2 = opt.update(g, s1, p1)
    torch.testing.assert_close(s2.momentum_buffer["w"], 0.5 * g["w"] + 0.5 * g["w"])
