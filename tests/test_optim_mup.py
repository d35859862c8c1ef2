"""mup's MuAdam / MuAdamW / MuSGD: per-parameter width scaling equals torch's optimizers over mup's param
groups; with mup installed, the engine equals mup's own optimizers; without it, a clear error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import zerostep.optim as zo
from zerostep.errors import ConfigError
from zerostep.optim import mup as zmup
from zerostep.optim.mup import WidthInfo, mu_optimizer

WIDTHS = {
    "hidden.weight": WidthInfo(2, 4.0, 2.0),  # matrix-like
    "readout.weight": WidthInfo(1, 4.0, 1.0),  # vector-like (one infinite dimension)
    "bias": WidthInfo(1, 2.0, 1.0),
    "scale": WidthInfo(0, 1.0, 1.0),  # fixed
}
SHAPES = {"hidden.weight": (3, 4), "readout.weight": (2, 4), "bias": (4,), "scale": (1,)}
TORCH = {"muadam": torch.optim.Adam, "muadamw": torch.optim.AdamW, "musgd": torch.optim.SGD}


def mup_groups(kind: str, params: dict, lr: float, wd: float) -> list[dict]:
    """mup 1.0's grouping, written out: the lr and weight decay of each parameter's group."""
    groups = []
    for name, p in params.items():
        w = WIDTHS[name]
        lr_m, wd_m = 1.0, 1.0
        if kind == "musgd":
            if w.ninf == 1:
                lr_m, wd_m = w.width_mult, 1 / w.width_mult
            elif w.ninf == 2:
                lr_m, wd_m = 1 / w.fanin_fanout_mult_ratio, w.fanin_fanout_mult_ratio
        elif w.ninf == 2:
            lr_m, wd_m = 1 / w.width_mult, w.width_mult
        groups.append({"params": [p], "lr": lr * lr_m, "weight_decay": wd * wd_m})
    return groups


@given(
    kind=st.sampled_from(list(TORCH)),
    seed=st.integers(0, 2**16),
    wd=st.sampled_from([0.0, 0.1]),
    flat=st.booleans(),
)
def test_width_scaling_equals_torch_over_mups_groups(kind, seed, wd, flat):
    gen = torch.Generator().manual_seed(seed)
    tree = {n: torch.randn(*s, generator=gen) for n, s in SHAPES.items()}
    grads_seq = [{n: torch.randn(*s, generator=gen) for n, s in SHAPES.items()} for _ in range(3)]
    extra = {"momentum": 0.9} if kind == "musgd" else {}
    ref = {n: t.clone().requires_grad_() for n, t in tree.items()}
    torch_opt = TORCH[kind](mup_groups(kind, ref, 1e-2, wd), lr=1e-2, **extra)
    if flat:
        from zerostep.parallel.flat import FlatLayout

        lay = FlatLayout.build(list(SHAPES.items()), torch.float32)
        pieces = zo.layout_pieces(
            lay.entries, 0, lay.padded_numel, sharded=False, full_numel=lay.padded_numel
        )
        opt = mu_optimizer(kind, WIDTHS, param_pieces={"u": pieces}, lr=1e-2, weight_decay=wd, **extra)
        params = {"u": lay.flatten(tree)}
    else:
        opt = mu_optimizer(kind, WIDTHS, lr=1e-2, weight_decay=wd, **extra)
        params = tree
    state = opt.init(params)
    for grads in grads_seq:
        opt.update_({"u": lay.flatten(grads)} if flat else grads, state, params)
        for n in ref:
            ref[n].grad = grads[n].clone()
        torch_opt.step()
    got = lay.unflatten(params["u"]) if flat else params
    for n in ref:
        assert torch.allclose(got[n], ref[n].detach(), rtol=1e-6, atol=1e-7), (kind, n)


def test_muadamw_defaults_weight_decay_to_zero_as_mup():
    opt = mu_optimizer("muadamw", WIDTHS, lr=1e-3)
    assert opt.hyperparams["weight_decay"] == 0.0


def test_lr_is_required_and_three_infinite_dims_refused():
    with pytest.raises(ConfigError, match="lr: required"):
        mu_optimizer("muadam", WIDTHS)
    opt = mu_optimizer("muadam", {"t": WidthInfo(3, 2.0, 1.0)}, lr=1e-3)
    with pytest.raises(ConfigError, match="3 infinite dimensions"):
        opt.init({"t": torch.zeros(2, 2, 2)})


def test_missing_mup_names_the_extra(monkeypatch):
    monkeypatch.setattr(zmup, "mup_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"needs the mup package.*zerostep\[mup\]"):
        zo.from_config({"type": "MuAdam", "params": {"lr": 1e-3}})


def test_parameters_without_infshape_are_named():
    with pytest.raises(ConfigError, match="set_base_shapes"):
        zo.param_widths(torch.nn.Linear(2, 3).named_parameters())


class Mlp(torch.nn.Module):
    """Every output width-sized: a finite-fan-out readout would need mup.MuReadout, whose forward reads
    ``self.weight.infshape`` (the engine's forward runs on its own flat buffers, which carry none)."""

    def __init__(self, width: int):
        super().__init__()
        self.inp = torch.nn.Linear(4, width)
        self.hidden = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


@pytest.mark.parametrize("kind", ["MuAdam", "MuSGD"])
def test_engine_equals_mups_own_optimizer(kind):
    mup = pytest.importorskip("mup")
    from zerostep.core import Config, initialize

    def model():
        torch.manual_seed(0)
        m = Mlp(8)
        mup.set_base_shapes(m, Mlp(2))
        return m

    params = {"lr": 1e-2, "weight_decay": 0.01}
    cfg = Config.from_dict(
        {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_clipping": 0.0,
            "optimizer": {"type": kind, "params": params},
        }
    )
    loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    engine = initialize(model(), cfg, loss_fn=loss_fn, compile=False)
    state = engine.init()
    ref = model()
    ref_opt = getattr(mup, kind)(ref.parameters(), **params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = (torch.randn(4, 4, generator=gen), torch.randn(4, 8, generator=gen))
        state = engine.step(state, batch)
        ref_opt.zero_grad()
        loss_fn(ref, batch).backward()
        ref_opt.step()
    got = engine.full_params(state)
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.detach(), rtol=1e-5, atol=1e-6), n
