"""Lion against a reference written from the paper (Chen et al. 2023, Program 1): sign of an
interpolated momentum, decoupled weight decay, momentum updated with beta2 after the step."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zerostep.optim as zo


def reference_lion(x, grads, lr, b1, b2, wd):
    x = x.double().clone()
    m = torch.zeros_like(x)
    for g in grads:
        g = g.double()
        update = torch.sign(b1 * m + (1 - b1) * g)
        x = x - lr * (update + wd * x)
        m = b2 * m + (1 - b2) * g
    return x


@settings(max_examples=10)
@given(
    st.lists(st.integers(1, 30), min_size=1, max_size=2),
    st.integers(0, 2**16),
    st.sampled_from([1e-4, 1e-3]),
    st.sampled_from([(0.9, 0.99), (0.95, 0.98)]),
    st.sampled_from([0.0, 0.1, 1.0]),
)
def test_lion_matches_the_paper(sizes, seed, lr, betas, wd):
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}
    steps = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(100)]
    opt = zo.lion(lr=lr, betas=betas, weight_decay=wd)
    state = opt.init(params)
    p = params
    for grads in steps:
        p, state = opt.update(grads, state, p)
    for k, x0 in params.items():
        ref = reference_lion(x0, [s[k] for s in steps], lr, *betas, wd)
        # fp32 against an fp64 reference: 100 roundings of p * (1 - lr * wd) drift a few ulps.
        torch.testing.assert_close(p[k].double(), ref, rtol=1e-5, atol=1e-6)
    assert state.count.item() == 100
