"""A tiny two-task problem for the trainer tests: fast, deterministic, CPU."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TwoHeads(nn.Module):
    """A shared trunk and two regression heads."""

    def __init__(self, d_in: int = 6, hidden: int = 12):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.a = nn.Linear(hidden, 1)
        self.b = nn.Linear(hidden, 1)

    def forward(self, x):
        z = self.trunk(x)
        return {"a": self.a(z).squeeze(-1), "b": self.b(z).squeeze(-1)}


def make_batches(
    n_batches: int = 8, batch: int = 16, d_in: int = 6, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, d_in, generator=g)
        y = torch.stack([x[:, 0] - x[:, 1], -x[:, 0] + 0.5 * x[:, 2]], dim=1)
        out.append((x, y))
    return out


def two_task_loss(outputs, batch):
    _, y = batch
    return {"a": F.mse_loss(outputs["a"], y[:, 0]), "b": F.mse_loss(outputs["b"], y[:, 1])}


def make_problem(seed: int = 0, lr: float = 0.05):
    torch.manual_seed(seed)
    model = TwoHeads()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return model, optimizer, make_batches(seed=seed), two_task_loss


class NaNLoss:
    """Losses turn NaN for ``count`` calls starting at call ``start``."""

    def __init__(self, start, count):
        self.start, self.count, self.calls = start, count, 0

    def __call__(self, outputs, batch):
        self.calls += 1
        losses = two_task_loss(outputs, batch)
        if self.start <= self.calls < self.start + self.count:
            return {k: v * float("nan") for k, v in losses.items()}
        return losses
