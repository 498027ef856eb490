"""Small models, optimizers and bitwise state comparisons shared by the state tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def make_model(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, 4))


def make_adam(model: nn.Module, lr: float = 1e-2) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int = 1, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(6, 8, generator=gen)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A private deep copy of model and optimizer state (tensors cloned)."""
    opt = optimizer.state_dict()
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "state": {
            i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for i, s in opt["state"].items()
        },
        "groups": [{k: v for k, v in g.items()} for g in opt["param_groups"]],
    }


def _bitwise_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        return torch.equal(
            a.detach().cpu().reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_bitwise_equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_state_equal(expected: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Bitwise: every model tensor, every optimizer state tensor, every hyperparameter."""
    actual = full_state(model, optimizer)
    for part in ("model", "state", "groups"):
        assert _bitwise_equal(expected[part], actual[part]), f"{part} differs"


def assert_state_differs(expected: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    actual = full_state(model, optimizer)
    assert not _bitwise_equal(expected["model"], actual["model"])
