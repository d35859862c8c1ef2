"""zerostep.ops: DeepSpeed's optimizer classes as torch optimizers over zerostep.optim's math."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zerostep import optim as zoptim
from zerostep.ops import zerostep_optimizer_spec
from zerostep.ops.adagrad import DeepSpeedCPUAdagrad
from zerostep.ops.adam import DeepSpeedCPUAdam, FusedAdam
from zerostep.ops.lamb import FusedLamb
from zerostep.ops.lion import DeepSpeedCPULion, FusedLion


def params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in ((4, 3), (3,), (2, 2, 2))
    ]


def set_grads(ps: list[torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)


def run(opt: torch.optim.Optimizer, ps: list[torch.Tensor], steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        set_grads(ps, step)
        opt.step()


@given(
    lr=st.sampled_from([1e-3, 0.05]),
    wd=st.sampled_from([0.0, 0.1]),
    beta2=st.sampled_from([0.999, 0.9]),
    w_mode=st.booleans(),
    steps=st.integers(1, 4),
)
def test_fused_adam_equals_torch_adam_and_adamw(lr, wd, beta2, w_mode, steps):
    ours, ref = params(), params()
    torch_cls = torch.optim.AdamW if w_mode else torch.optim.Adam
    ds = FusedAdam(ours, lr=lr, betas=(0.9, beta2), weight_decay=wd, adam_w_mode=w_mode)
    run(ds, ours, steps)
    run(torch_cls(ref, lr=lr, betas=(0.9, beta2), weight_decay=wd), ref, steps)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_param_groups_lr_writes_and_bias_correction_off():
    ps = params()
    opt = FusedAdam([{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "lr": 0.0}], bias_correction=False)
    frozen = ps[2].detach().clone()
    before = ps[0].detach().clone()
    set_grads(ps, 0)
    grad = ps[0].grad.clone()
    opt.step()
    # without bias correction: m = 0.1 g, v = 0.001 g^2, p -= lr * m / (sqrt(v) + eps)
    expected = before - 0.1 * (0.1 * grad) / ((0.001 * grad * grad).sqrt() + 1e-8)
    torch.testing.assert_close(ps[0].detach(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(ps[2].detach(), frozen)  # lr 0
    opt.param_groups[0]["lr"] = 0.0  # written between steps: takes effect at the next one
    opt.param_groups[1]["lr"] = 0.1
    now = ps[0].detach().clone()
    set_grads(ps, 1)
    opt.step()
    assert torch.equal(ps[0].detach(), now) and not torch.equal(ps[2].detach(), frozen)
    assert [float(opt.state[p]["step"]) for p in ps] == [2.0, 2.0, 2.0]  # every parameter counts its steps


def test_state_dict_round_trip_and_torch_adamw_state_loads():
    ps, twin = params(), params()
    a = FusedAdam(ps, lr=0.01, weight_decay=0.1)
    run(a, ps, 2)
    saved = copy.deepcopy(a.state_dict())
    b = FusedAdam(twin, lr=0.5)  # its own hyperparameters are replaced by the loaded ones
    with torch.no_grad():
        for t, p in zip(twin, ps):
            t.copy_(p)
    b.load_state_dict(saved)
    run(a, ps, 2, start=2)
    run(b, twin, 2, start=2)
    for x, y in zip(ps, twin):
        assert torch.equal(x, y)

    ref, ours = params(), params()
    adamw = torch.optim.AdamW(ref, lr=0.01)
    run(adamw, ref, 2)
    with torch.no_grad():
        for o, r in zip(ours, ref):
            o.copy_(r)
    fused = FusedAdam(ours, lr=0.01, weight_decay=0.01)
    fused.load_state_dict(adamw.state_dict())  # torch's layout: step, exp_avg, exp_avg_sq
    run(adamw, ref, 2, start=2)
    run(fused, ours, 2, start=2)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-7)

    legacy = FusedAdam(params(), lr=0.01)
    state = copy.deepcopy(fused.state_dict())
    for entry in state["state"].values():
        entry["step"] = 2  # DeepSpeed's FusedAdam keeps an int
    legacy.load_state_dict(state)
    run(legacy, [p for g in legacy.param_groups for p in g["params"]], 1)
    assert all(float(s["step"]) == 3.0 for s in legacy.state.values())


def test_low_precision_params_keep_fp32_moments_unless_asked():
    ps = params(dtype=torch.bfloat16)
    opt = FusedAdam(ps, lr=0.01)
    run(opt, ps, 1)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in ps) and ps[0].dtype == torch.bfloat16
    again = FusedAdam(params(dtype=torch.bfloat16), lr=0.01)
    again.load_state_dict(opt.state_dict())  # torch alone would cast the moments to bf16
    assert all(s["exp_avg_sq"].dtype == torch.float32 for s in again.state.values())
    small = params(dtype=torch.bfloat16)
    cpu_adam = DeepSpeedCPUAdam(small, lr=0.01, fp32_optimizer_states=False)
    run(cpu_adam, small, 1)
    assert all(cpu_adam.state[p]["exp_avg"].dtype == torch.bfloat16 for p in small)


def test_cpu_adam_matches_fused_adam_and_both_refuse_what_deepspeed_refuses():
    x, y = params(), params()
    run(DeepSpeedCPUAdam(x, lr=0.02, weight_decay=0.1, adamw_mode=False), x, 3)
    run(FusedAdam(y, lr=0.02, weight_decay=0.1, adam_w_mode=False), y, 3)
    for a, b in zip(x, y):
        assert torch.equal(a, b)
    assert (
        DeepSpeedCPUAdam(params()).adam_w_mode is True
        and FusedAdam(params(), adam_w_mode=False).adam_w_mode == 0
    )
    with pytest.raises(RuntimeError, match="AMSGrad"):
        FusedAdam(params(), amsgrad=True)
    with pytest.raises(RuntimeError, match="AMSGrad"):
        DeepSpeedCPUAdam(params(), amsgrad=True)
    opt = FusedAdam(params())
    with pytest.raises(RuntimeError, match="call step\\(\\) with no arguments"):
        opt.step(scale=2.0)
    with pytest.raises(ValueError, match="FusedAdam: lr: -1"):
        FusedAdam(params(), lr=-1)
    sparse = torch.nn.Parameter(torch.zeros(3))
    sparse.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        FusedAdam([sparse]).step()


def test_zero_grad_follows_set_grad_none_and_closure_runs_with_grad():
    ps = params()
    keep = FusedAdam(ps, set_grad_none=False)
    set_grads(ps, 0)
    keep.zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in ps)
    FusedAdam(ps).zero_grad()
    assert all(p.grad is None for p in ps)

    def closure():
        loss = sum((p * p).sum() for p in ps)
        loss.backward()
        return loss

    assert FusedAdam(ps).step(closure).requires_grad


def test_spec_names_the_same_math():
    ps = params()
    opt = FusedAdam(
        [{"params": ps[:1], "lr": 0.2}, {"params": ps[1:]}],
        lr=0.01,
        betas=(0.8, 0.99),
        weight_decay=0.1,
        adam_w_mode=False,
        bias_correction=False,
    )
    kind, kwargs = zerostep_optimizer_spec(opt)
    assert kind == "adam" and kwargs == dict(
        lr=0.2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1, adam_w_mode=False, bias_correction=False
    )
    assert zerostep_optimizer_spec(opt, opt.param_groups[1])[1]["lr"] == 0.01
    assert opt.zerostep_spec()[1]["lr"] == 0.01  # the constructor's defaults
    functional = getattr(zoptim, kind)(**kwargs)
    assert zoptim.from_config({"type": kind, "params": kwargs}).hyperparams == functional.hyperparams

    # the functional optimizer from the spec takes the same step as the torch object
    p = ps[0]
    mirror = p.detach().clone()
    state = functional.init(mirror)
    set_grads(ps, 0)
    grad = p.grad.clone()
    opt.step()
    new, _ = functional.update(grad, state, mirror)
    assert torch.equal(new, p.detach())

    w = torch.nn.Parameter(torch.ones(2))
    assert zerostep_optimizer_spec(torch.optim.AdamW([w], lr=0.1)) == (
        "adam",
        dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, adam_w_mode=True, bias_correction=True),
    )
    assert zerostep_optimizer_spec(torch.optim.Adam([w]))[1]["adam_w_mode"] is False
    assert (
        zerostep_optimizer_spec(torch.optim.Adam([w], decoupled_weight_decay=True))[1]["adam_w_mode"] is True
    )
    assert zerostep_optimizer_spec(torch.optim.Adam([w], lr=torch.tensor(0.1)))[1]["lr"] == pytest.approx(0.1)
    assert zerostep_optimizer_spec(torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True)) == (
        "sgd",
        dict(lr=0.1, momentum=0.9, dampening=0, weight_decay=0, nesterov=True),
    )
    assert zerostep_optimizer_spec(torch.optim.Adagrad([w]))[0] == "adagrad"
    assert zerostep_optimizer_spec(torch.optim.Adam([w], amsgrad=True)) is None
    assert zerostep_optimizer_spec(torch.optim.SGD([w], lr=0.1, maximize=True)) is None
    assert zerostep_optimizer_spec(torch.optim.RMSprop([w])) is None


def _functional_reference(kind: str, kwargs: dict, ps: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """The spec's functional optimizer run per parameter (LAMB's trust ratio is per parameter)."""
    functional = getattr(zoptim, kind)(**kwargs)
    out = []
    for index, p in enumerate(ps):
        x = p.detach().clone()
        state = functional.init(x)
        for step in range(steps):
            grads = [torch.empty_like(q) for q in ps]
            set_grads(grads, step)
            x, state = functional.update(grads[index].grad, state, x)
        out.append(x)
    return out


def test_lamb_lion_adagrad():
    ps = params()
    lamb = FusedLamb(ps, lr=0.01, weight_decay=0.01, eps_inside_sqrt=True, max_coeff=5.0)
    kind, kwargs = lamb.zerostep_spec()
    assert kind == "lamb" and kwargs["eps_inside_sqrt"] and kwargs["max_coeff"] == 5.0
    expected = _functional_reference(kind, kwargs, params(), 3)
    run(lamb, ps, 3)
    for a, b in zip(ps, expected):
        assert torch.equal(a.detach(), b)
    with pytest.raises(ValueError, match="gradient_clipping"):
        FusedLamb(params(), max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="AMSGrad"):
        FusedLamb(params(), amsgrad=True)

    # Lion: update = sign(b1 m + (1 - b1) g); p = p (1 - lr wd) - lr update; m = b2 m + (1 - b2) g
    ps = params()
    lion = FusedLion(ps, lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    start = [p.detach().clone() for p in ps]
    run(lion, ps, 2)
    for p, x in zip(ps, start):
        m = torch.zeros_like(x)
        for step in range(2):
            grads = [torch.empty_like(q) for q in params()]
            set_grads(grads, step)
            g = grads[[t.shape for t in params()].index(x.shape)].grad
            x = x * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
            m = 0.99 * m + 0.01 * g
        torch.testing.assert_close(p.detach(), x)
    cpu_lion = DeepSpeedCPULion(params(), fp32_optimizer_states=False)
    assert cpu_lion.zerostep_spec() == ("lion", dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0))

    x, y = params(), params()
    run(DeepSpeedCPUAdagrad(x, lr=0.1), x, 3)
    run(torch.optim.Adagrad(y, lr=0.1, eps=1e-10), y, 3)
    for a, b in zip(x, y):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="decays only the squared-gradient sum"):
        DeepSpeedCPUAdagrad(params(), weight_decay=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_adam_on_cuda_equals_torch_adamw():
    ours = [p.detach().cuda().requires_grad_() for p in params()]
    ref = [p.detach().cuda().requires_grad_() for p in params()]
    fused = FusedAdam(ours, lr=0.01, weight_decay=0.1)  # the Triton kernel when triton imports
    adamw = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1)
    for step in range(3):
        set_grads(ours, step)
        set_grads(ref, step)
        fused.step()
        adamw.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(fused.state[p]["exp_avg"].is_cuda for p in ours)
