"""A small pipeline model for the pipeline tests (importable by spawned ranks)."""

import torch
import torch.nn.functional as F
from torch import nn

from zerostep.pipe import LayerSpec, TiedLayerSpec

WIDTH = 6


def tied_head(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x @ module.weight  # the embedding reused, transposed, as the output projection


def specs(tied: bool = True) -> list:
    body = [LayerSpec(nn.Linear, WIDTH, WIDTH), nn.Tanh(), LayerSpec(nn.Linear, WIDTH, WIDTH), nn.Tanh()] * 2
    if not tied:
        return [LayerSpec(nn.Linear, WIDTH, WIDTH), *body, LayerSpec(nn.Linear, WIDTH, WIDTH)]
    emb = TiedLayerSpec("emb", nn.Linear, WIDTH, WIDTH, bias=False)
    head = TiedLayerSpec("emb", nn.Linear, WIDTH, WIDTH, bias=False, forward_fn=tied_head)
    return [emb, *body, head]


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def batches(steps: int, rows: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(rows, WIDTH, generator=g), torch.randn(rows, WIDTH, generator=g)) for _ in range(steps)
    ]


def config(schedule: str = "1f1b", stage: int = 0, gas: int = 4, mb: int = 2) -> dict:
    return {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.05,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage},
        "pipeline": {"schedule": schedule},
    }
