"""The process the crash-consistency test kills: it checkpoints deterministic state in a loop."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from tolaria.signals import SharedDeadlineSignal
from tolaria.state import StateManager
from tolaria.telemetry import MemorySink, TelemetryEmitter

# Imported by the fork server before it forks the children: the first optimizer built in a process
# pays for lazy imports (about a second here), so pay it once, in the server, not in every child.
torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def make_objects() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Adam's state as its first step creates it, made directly: a first step() in a fresh process
    # spends seconds on lazy imports, which would dominate a test that starts many processes.
    for p in model.parameters():
        optimizer.state[p] = {
            "step": torch.tensor(0.0),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
    return model, optimizer


def _tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    found = list(model.state_dict().values())
    for state in optimizer.state.values():
        found.extend(state[k] for k in sorted(state))
    return found


def fill(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Writes a pattern that identifies ``step`` into every model and optimizer tensor."""
    with torch.no_grad():
        for i, t in enumerate(_tensors(model, optimizer)):
            t.copy_(torch.full_like(t, float(step)) + i * 1e-3)


def check(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> list[str]:
    """Names of the tensors that do not hold ``step``'s pattern (empty if all do)."""
    bad = []
    for i, t in enumerate(_tensors(model, optimizer)):
        if not torch.equal(t, torch.full_like(t, float(step)) + i * 1e-3):
            bad.append(f"tensor {i} {tuple(t.shape)}")
    return bad


def checkpoint_forever(root: str, first_step: int, committed: Any, signal_name: str) -> None:
    """Checkpoints steps first_step, first_step + 1, ... until killed; ``committed.value`` = last commit.

    It attaches to the test's deadline signal rather than creating one: a killed process would leave
    its own segment behind.
    """
    torch.set_num_threads(1)
    model, optimizer = make_objects()
    signal = SharedDeadlineSignal.attach(signal_name)
    with StateManager(
        root, fast_cache_mb=0, keep_last=3, telemetry=TelemetryEmitter([MemorySink()]), deadline_signal=signal
    ) as manager:
        for step in itertools.count(first_step):
            fill(model, optimizer, step)
            manager.checkpoint(step, model, optimizer, extra={"step": step})
            committed.value = step
