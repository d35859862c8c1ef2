"""The fused Triton kernels against the torch path, on CPU under TRITON_INTERPRET=1.

The interpreter must be selected before triton is first imported, and other tests in this
process may already have imported it, so the checks run in a fresh subprocess.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = textwrap.dedent(
    """
    import torch
    from zerostep.optim import adam, lamb, triton_kernels
    from zerostep.optim.adam import adam_leaf_

    assert triton_kernels.available()
    torch.manual_seed(0)
    n = 3000  # not a multiple of the block: exercises the masked tail

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape).to(dtype)

    def assert_same_cast(low, high):
        # The interpreter truncates fp32 -> bf16 (compiled Triton rounds to nearest even, as torch
        # does), so bf16 copies may sit one ulp below torch's cast; fp16 casts are exact.
        if low.dtype == torch.bfloat16:
            torch.testing.assert_close(low.float(), high.bfloat16().float(), rtol=2**-7, atol=0)
        else:
            assert torch.equal(low, high.to(low.dtype))

    # AdamW / Adam: kernel vs torch ops, three steps with varying lr, grad scale and beta1.
    for adam_w_mode in (True, False):
        for low in (None, torch.bfloat16, torch.float16):
            p_k, p_t = rand(n), None
            p_t = p_k.clone()
            m_k, v_k = torch.zeros(n), torch.zeros(n)
            m_t, v_t = m_k.clone(), v_k.clone()
            out = None if low is None else torch.empty(n, dtype=low)
            for t in range(1, 4):
                g = rand(n)
                lr, scale, b1, b2 = 1e-2 / t, 0.5 * t, 0.9 - 0.05 * t, 0.999
                bc1 = 1 - b1**t
                bc2_sqrt = (1 - b2**t) ** 0.5
                s = triton_kernels.adam_scalars(lr, torch.tensor(scale), b1, b2, bc1, bc2_sqrt, p_k.device)
                triton_kernels.adam_step_(p_k, g, m_k, v_k, s, eps=1e-8, weight_decay=0.1,
                                          adam_w_mode=adam_w_mode, out=out)
                adam_leaf_(p_t, g, m_t, v_t, lr=lr, beta1=b1, beta2=b2, bc1=bc1, bc2_sqrt=bc2_sqrt, eps=1e-8,
                           weight_decay=0.1, adam_w_mode=adam_w_mode, grad_scale=scale, copy=None)
            # Same math, different operation order: a few fp32 ulps apart.
            torch.testing.assert_close(p_k, p_t, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(m_k, m_t, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(v_k, v_t, rtol=1e-6, atol=1e-9)
            if out is not None:
                assert_same_cast(out, p_k)

    # bf16 params updated in place (fp32 math, fp32 moments).
    p16 = rand(n, dtype=torch.bfloat16)
    ref16 = p16.clone()
    m1, v1, m2, v2 = torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)
    g = rand(n)
    s = triton_kernels.adam_scalars(1e-2, None, 0.9, 0.999, 0.1, (1 - 0.999) ** 0.5, p16.device)
    triton_kernels.adam_step_(p16, g, m1, v1, s, eps=1e-8, weight_decay=0.0, adam_w_mode=True)
    adam_leaf_(ref16, g, m2, v2, lr=1e-2, beta1=0.9, beta2=0.999, bc1=0.1, bc2_sqrt=(1 - 0.999) ** 0.5,
               eps=1e-8, weight_decay=0.0, adam_w_mode=True, grad_scale=None, copy=None)
    torch.testing.assert_close(p16.float(), ref16.float(), rtol=1e-2, atol=1e-2)

    # The optimizers' own dispatch, forced onto the kernels, vs their torch path (LAMB: both passes).
    for make in (lambda u: adam(lr=1e-2, weight_decay=0.1, adam_w_mode=True, use_triton=u),
                 lambda u: lamb(lr=1e-2, weight_decay=0.1, use_triton=u),
                 lambda u: lamb(lr=1e-2, weight_decay=0.0, eps_inside_sqrt=True, use_triton=u)):
        params = {"a": rand(n), "b": rand(7)}
        fused, plain = make(True), make(False)
        pf, sf = {k: v.clone() for k, v in params.items()}, fused.init(params)
        pp, sp = {k: v.clone() for k, v in params.items()}, plain.init(params)
        copies = {k: torch.empty(v.shape, dtype=torch.bfloat16) for k, v in params.items()}
        for t in range(3):
            grads = {k: rand(*v.shape) for k, v in params.items()}
            lr, scale = torch.tensor(1e-2 / (t + 1)), torch.tensor(2.0)
            fused.update_(grads, sf, pf, lr, grad_scale=scale, param_copies=copies)
            plain.update_(grads, sp, pp, lr, grad_scale=scale)
        for k in params:
            torch.testing.assert_close(pf[k], pp[k], rtol=1e-5, atol=1e-6)
            assert_same_cast(copies[k], pf[k])
    print("TRITON_OK")
    """
)


def test_triton_kernels_match_the_torch_path_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", ZEROSTEP_TRITON="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0 and "TRITON_OK" in result.stdout, result.stdout + result.stderr


def test_optim_imports_without_triton():
    code = "import sys; sys.modules['triton'] = None; import zerostep.optim as zo; " \
           "from zerostep.optim import triton_kernels; assert not triton_kernels.available(); print('OK')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr
