"""LAMB against a reference written from the paper (You et al. 2019, Algorithm 2) with DeepSpeed
FusedLamb's choices: eps outside the root, decay inside the update, trust ratio clamped."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zerostep.optim as zo


def reference_lamb(params, grads_per_step, lr, b1, b2, eps, wd, max_coeff, min_coeff):
    """fp64, one tensor at a time, straight from the algorithm."""
    out = {}
    for name, x0 in params.items():
        x = x0.double().clone()
        m = torch.zeros_like(x)
        v = torch.zeros_like(x)
        for t, grads in enumerate(grads_per_step, start=1):
            g = grads[name].double()
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            r = m_hat / (v_hat.sqrt() + eps) + wd * x
            w_norm, r_norm = x.norm().item(), r.norm().item()
            ratio = min(max(w_norm / r_norm, min_coeff), max_coeff) if w_norm > 0 and r_norm > 0 else 1.0
            x = x - lr * ratio * r
        out[name] = x
    return out


@settings(max_examples=10)
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=3),
    st.integers(0, 2**16),
    st.sampled_from([1e-3, 1e-2]),
    st.sampled_from([0.0, 0.01]),
    st.sampled_from([(10.0, 0.01), (1.0, 0.5)]),
)
def test_lamb_matches_the_paper(sizes, seed, lr, wd, coeffs):
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(n, generator=gen) * 0.1 for i, n in enumerate(sizes)}
    steps = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(50)]
    max_coeff, min_coeff = coeffs
    opt = zo.lamb(lr=lr, weight_decay=wd, max_coeff=max_coeff, min_coeff=min_coeff)
    state = opt.init(params)
    p = params
    for grads in steps:
        p, state = opt.update(grads, state, p)
    ref = reference_lamb(params, steps, lr, 0.9, 0.999, 1e-8, wd, max_coeff, min_coeff)
    for k in params:
        torch.testing.assert_close(p[k].double(), ref[k], rtol=1e-5, atol=1e-6)


def test_trust_ratio_is_one_for_zero_params_and_clamped_otherwise():
    opt = zo.lamb(lr=0.1, max_coeff=2.0, min_coeff=0.5)
    zero = {"w": torch.zeros(4)}
    g = {"w": torch.ones(4)}
    p, _ = opt.update(g, opt.init(zero), zero)
    # ||p|| = 0 -> ratio 1; first Adam step of a constant gradient is 1/(1+eps) per element.
    torch.testing.assert_close(p["w"], torch.full((4,), -0.1), rtol=1e-6, atol=1e-7)
    big = {"w": torch.full((4,), 100.0)}
    p, _ = opt.update(g, opt.init(big), big)
    torch.testing.assert_close(p["w"], torch.full((4,), 100.0 - 0.1 * 2.0), rtol=1e-6, atol=1e-6)


def test_norm_reduce_sees_the_local_sums():
    seen = []

    def reduce(sums):
        seen.append(sums.clone())
        return sums * 4  # as if four equal shards were summed

    opt = zo.lamb(lr=0.1, norm_reduce=reduce)
    p = {"w": torch.full((3,), 2.0)}
    opt.update({"w": torch.ones(3)}, opt.init(p), p)
    torch.testing.assert_close(seen[0][0], torch.tensor(12.0))
    assert math.isclose(seen[0][1].item(), 3.0, rel_tol=1e-5)
