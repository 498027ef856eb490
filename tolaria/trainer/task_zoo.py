"""The tasks ``tolaria train --task NAME`` and ``tolaria compare --task NAME`` can train.

All are built from data that scikit-learn ships (nothing is downloaded), sized for a CPU:

- ``two-digits`` (the default, K = 2): two digits side by side, one head per position (see
  :mod:`.tasks`). Its two sources barely conflict (pairwise cosine within about +-0.04), so no
  aggregator can show a difference on it.
- ``digit-attributes`` (K = 4): one 8 x 8 digit, four heads on the same shared trunk: the digit
  itself (10 classes), its parity, whether it is >= 5, whether it is prime. Parity, magnitude and
  primality cut the ten digits along different lines, so the heads ask the trunk for different
  features and their gradients conflict: with the mean aggregator, about 80% of steps have at
  least one pair of sources with a negative cosine, a quarter of all pairs do (see
  benchmarks/RESULTS.md, "Sixth session").
- ``digit-attributes-noisy`` (K = 5): the same four heads plus a fifth whose labels are random
  (fixed per image): a source that can only be memorised, and that pulls against the others; the
  case conflict-aware aggregators are meant for.

Every task model has ``model.trunk`` (input -> the shared representation, the features, a
``(batch, hidden)`` tensor) and ``model.heads`` (one head per source on the features); ``model(x)``
returns ``{source: logits}`` and the task's loss ``{source: cross-entropy}``. The trainer
aggregates the trunk's gradients (``shared=task.model.trunk``); the heads get their plain gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .tasks import DigitsTaskConfig, ShuffledBatches, build_default_task, load_digit_images

DEFAULT_TASK = "two-digits"

# Digit -> attribute label, one table per head of the attribute tasks.
_PARITY = (0, 1, 0, 1, 0, 1, 0, 1, 0, 1)
_LARGE = (0, 0, 0, 0, 0, 1, 1, 1, 1, 1)
_PRIME = (0, 0, 1, 1, 0, 1, 0, 1, 0, 0)
ATTRIBUTE_HEADS = {"digit": 10, "parity": 2, "large": 2, "prime": 2}
NOISY_CLASSES = 10


@dataclass
class Task:
    """Everything ``Trainer`` needs for one task, plus its evaluation.

    Attributes:
        name: the task's name (one of :data:`TASK_NAMES`).
        sources: the gradient sources (the loss names), in order.
        model: the model (``.trunk`` and ``.heads``, see the module docstring).
        optimizer, data, loss_fn: as ``Trainer`` takes them.
        evaluate: ``evaluate(model) -> {"accuracy/<source>": value}`` on held-out examples.
        description: one line for the command line's messages.
    """

    name: str
    sources: tuple[str, ...]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: ShuffledBatches
    loss_fn: Callable[[Any, Any], dict[str, Tensor]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    description: str


class MultiHeadNet(nn.Module):
    """A shared MLP trunk (two hidden layers) and one linear head per source; returns ``{source: logits}``."""

    def __init__(self, in_features: int, hidden: int, classes: Mapping[str, int]):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in classes.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.trunk(x)
        return {name: head(features) for name, head in self.heads.items()}


class HeadsLoss:
    """One cross-entropy per source; column ``i`` of the batch's labels belongs to source ``i``."""

    def __init__(self, sources: tuple[str, ...]):
        self.sources = sources

    def __call__(self, outputs: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        _, y = batch
        return {name: F.cross_entropy(outputs[name], y[:, i]) for i, name in enumerate(self.sources)}


class HeadsAccuracy:
    """Per-source accuracy on held-out ``(x, y)``, in batches, on the model's device."""

    def __init__(self, sources: tuple[str, ...], x: Tensor, y: Tensor, batch_size: int = 1024):
        self.sources, self.x, self.y, self.batch_size = sources, x, y, batch_size

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        correct = dict.fromkeys(self.sources, 0)
        for start in range(0, len(self.x), self.batch_size):
            out = model(self.x[start : start + self.batch_size].to(device))
            target = self.y[start : start + self.batch_size]
            for i, name in enumerate(self.sources):
                correct[name] += int((out[name].argmax(dim=1).cpu() == target[:, i]).sum())
        return {f"accuracy/{name}": correct[name] / len(self.x) for name in self.sources}


def _optimizer(model: nn.Module, cfg: DigitsTaskConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def load_digit_attributes(cfg: DigitsTaskConfig, *, noisy: bool) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Train and test ``(x, y)`` of single digits: x (n x 8 x 8, in [0, 1]), y (n x K) of the
    attribute labels (and, with ``noisy``, a last column of random labels fixed per image)."""
    images, digit = load_digit_images()
    columns = [digit] + [torch.tensor(table)[digit] for table in (_PARITY, _LARGE, _PRIME)]
    gen = torch.Generator().manual_seed(cfg.seed)
    if noisy:
        columns.append(torch.randint(NOISY_CLASSES, (len(digit),), generator=gen))
    labels = torch.stack(columns, dim=1)
    order = torch.randperm(len(images), generator=gen)
    n_test = int(round(cfg.test_fraction * len(images)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])


def _build_attributes(cfg: DigitsTaskConfig, *, noisy: bool) -> Task:
    classes = dict(ATTRIBUTE_HEADS)
    if noisy:
        classes["noisy"] = NOISY_CLASSES
    sources = tuple(classes)
    (x, y), (x_test, y_test) = load_digit_attributes(cfg, noisy=noisy)
    torch.manual_seed(cfg.seed)
    model = MultiHeadNet(8 * 8, cfg.hidden, classes)
    name = "digit-attributes-noisy" if noisy else "digit-attributes"
    return Task(
        name=name,
        sources=sources,
        model=model,
        optimizer=_optimizer(model, cfg),
        data=ShuffledBatches(x, y, cfg.batch_size, seed=cfg.seed),
        loss_fn=HeadsLoss(sources),
        evaluate=HeadsAccuracy(sources, x_test, y_test),
        description=f"the {name} task ({len(x)} digits, heads {', '.join(sources)})",
    )


def _build_two_digits(cfg: DigitsTaskConfig) -> Task:
    task = build_default_task(cfg)
    return Task(
        name=DEFAULT_TASK,
        sources=tuple(task.model.heads),
        model=task.model,
        optimizer=task.optimizer,
        data=task.data,
        loss_fn=task.loss_fn,
        evaluate=task.evaluate,
        description=f"the two-digit task ({len(task.data.x)} pairs)",
    )


BUILDERS: dict[str, Callable[[DigitsTaskConfig], Task]] = {
    DEFAULT_TASK: _build_two_digits,
    "digit-attributes": lambda cfg: _build_attributes(cfg, noisy=False),
    "digit-attributes-noisy": lambda cfg: _build_attributes(cfg, noisy=True),
}
TASK_NAMES = tuple(BUILDERS)


def build_task(name: str, cfg: DigitsTaskConfig | None = None) -> Task:
    """Data, model (seeded by ``cfg.seed``), optimizer, loss and evaluation of task ``name``.

    ``cfg`` is the ``[task]`` table of a config (:class:`~tolaria.trainer.tasks.DigitsTaskConfig`);
    ``train_pairs`` and ``test_pairs`` apply to the two-digit task only (the attribute tasks use
    every digit image, split by ``test_fraction``).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASK_NAMES)}")
    return BUILDERS[name](cfg or DigitsTaskConfig())


__all__ = [
    "ATTRIBUTE_HEADS",
    "BUILDERS",
    "DEFAULT_TASK",
    "HeadsAccuracy",
    "HeadsLoss",
    "MultiHeadNet",
    "TASK_NAMES",
    "Task",
    "build_task",
    "load_digit_attributes",
]
