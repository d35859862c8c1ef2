"""Small models shared by the multi-rank tests (importable by spawned ranks)."""

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """Three ZeRO units: two blocks in a ModuleList plus the root (input layer and head)."""

    def __init__(self, hidden: int = 7):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])
