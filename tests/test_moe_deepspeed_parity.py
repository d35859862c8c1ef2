"""MoE against DeepSpeed itself: one DeepSpeed-style script with an MoE model (2 gloo ranks, ep_size 2, the
optimizer's MoE param groups) through ``deepspeed`` and through ``zerostep`` gives the same weights at ZeRO
stages 0-2 (DeepSpeed's MoE has no stage 3): the same expert gradient scaling (the expert-data-parallel
sum over the data-parallel size). Without clipping, on purpose: zerostep clips by the true global norm
(dense gradients once, every expert once), while DeepSpeed's MoE norm is per rank (dense and this rank's
experts; at stage 0 the mean of the ranks' norms, at stages 1-2 the expert part averaged over the
expert-data-parallel group), so with clipping the two differ by design. Runs only where DeepSpeed is installed
(e.g. ``/work/dsvenv/bin/python -m pytest tests/test_moe_deepspeed_parity.py``); CI skips it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zerostep.parallel.launch import spawn_ranks

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (its comparison is optional)")

M, E, MB, STEPS = 6, 4, 4, 3


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(M, 10), nn.Linear(10, M)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Net(nn.Module):
    def __init__(self, library):
        super().__init__()
        self.inp = nn.Linear(3, M)
        self.moe = library.moe.layer.MoE(
            M,
            Mlp(),
            num_experts=E,
            ep_size=2,
            k=2,
            min_capacity=0,
            drop_tokens=False,
            top2_2nd_expert_sampling=False,
        )
        self.head = nn.Linear(M, 1)

    def forward(self, x):
        h = self.inp(x)
        out, l_aux, _ = self.moe(h)
        return self.head(h + out), l_aux


def initial_weights() -> dict:
    """Every weight by zerostep's (global) names: dense ones and all E experts."""
    g = torch.Generator().manual_seed(0)
    shapes = {"inp.weight": (M, 3), "inp.bias": (M,), "head.weight": (1, M), "head.bias": (1,)}
    shapes["moe.deepspeed_moe.gate.wg.weight"] = (E, M)
    for e in range(E):
        for name, shape in {
            "a.weight": (10, M),
            "a.bias": (10,),
            "b.weight": (M, 10),
            "b.bias": (M,),
        }.items():
            shapes[f"moe.deepspeed_moe.experts.deepspeed_experts.{e}.{name}"] = shape
    return {n: torch.randn(s, generator=g) * 0.5 for n, s in shapes.items()}


def global_name(name: str, first: int) -> str:
    """DeepSpeed's local expert ``i`` on a rank whose first expert is ``first`` is global ``first + i``."""
    if ".deepspeed_experts." not in name:
        return name
    head, tail = name.split(".deepspeed_experts.")
    i, rest = tail.split(".", 1)
    return f"{head}.deepspeed_experts.{first + int(i)}.{rest}"


def train(library, stage: int, clip: float, rank: int, world: int) -> dict:
    import importlib

    importlib.import_module(f"{library.__name__}.moe.layer")
    importlib.import_module(f"{library.__name__}.moe.utils")
    torch.manual_seed(0)
    model = Net(library)
    first = rank * (E // 2)  # both hold only their own experts
    weights = initial_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[global_name(name, first)])
    groups = library.moe.utils.split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "dense"}
    )
    config = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_clipping": clip,
        "steps_per_print": 1000,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
    }
    kwargs = {} if library.__name__ == "deepspeed" else {"compile": False}
    engine, _, _, _ = library.initialize(model=model, model_parameters=groups, config=config, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(MB * world, 3, generator=g), torch.randn(MB * world, 1, generator=g)
        rows = slice(rank * MB, (rank + 1) * MB)
        pred, l_aux = engine(x[rows])
        engine.backward(F.mse_loss(pred, y[rows]) + 0.1 * l_aux)
        engine.step()
    return {global_name(n, first): p.detach().float().clone() for n, p in engine.module.named_parameters()}


def both(rank: int, world: int) -> dict:
    import deepspeed

    import zerostep

    out = {}
    for stage in range(3):
        for clip in (0.0,):
            out[(stage, clip)] = (
                train(deepspeed, stage, clip, rank, world),
                train(zerostep, stage, clip, rank, world),
            )
    return out


def test_moe_trains_as_deepspeed_does():
    for rank, per_case in enumerate(spawn_ranks(both, 2, timeout=600)):
        for case, (ds_weights, zs_weights) in per_case.items():
            for name, want in ds_weights.items():  # each rank holds its own experts only
                torch.testing.assert_close(
                    zs_weights[name], want, rtol=1e-5, atol=1e-6, msg=f"{rank} {case} {name}"
                )
