"""The embedded default task of ``tolaria train``: two handwritten digits side by side.

A MultiMNIST-style two-task problem built from scikit-learn's bundled digits (1797 images of 8 x 8
pixels, shipped with scikit-learn, so nothing is downloaded). Each example is two digits placed side
by side (an 8 x 16 image); the model has a small shared trunk and one classification head per digit
position, so the two cross-entropy losses ("left", "right") are two gradient sources pulling the
same trunk. The digits are split into train and test images *before* pairing, so no test image is
ever seen in training.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import ConfigError, _positive, _Section

TASKS = ("left", "right")


@dataclass
class DigitsTaskConfig(_Section):
    """The default task's settings (the ``[task]`` table of a ``tolaria train`` config).

    Attributes:
        train_pairs: training examples (pairs of digits) per epoch (default 20000).
        test_pairs: held-out pairs for accuracy (default 4000).
        test_fraction: share of the 1797 digit images reserved for test pairs (default 0.25).
        batch_size: examples per step (default 128).
        hidden: width of the shared trunk's two hidden layers (default 256).
        optimizer: ``"adamw"`` (default) or ``"sgd"`` (with momentum 0.9).
        lr: learning rate (default 1e-3).
        weight_decay: (default 1e-4).
        seed: seeds the split, the pairing and the shuffles (default 0).
    """

    train_pairs: int = 20000
    test_pairs: int = 4000
    test_fraction: float = 0.25
    batch_size: int = 128
    hidden: int = 256
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_types("task.")
        for name in ("train_pairs", "test_pairs", "batch_size", "hidden", "lr"):
            _positive("task.", name, getattr(self, name))
        _positive("task.", "weight_decay", self.weight_decay, allow_zero=True)
        if not 0.05 <= self.test_fraction <= 0.95:
            raise ConfigError(f"task.test_fraction must lie in [0.05, 0.95], got {self.test_fraction}")


def make_pairs(images: Tensor, labels: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` random pairs of ``images`` (M x 8 x 8) side by side: (n x 8 x 16 images, n x 2 labels)."""
    left = torch.randint(len(images), (n,), generator=generator)
    right = torch.randint(len(images), (n,), generator=generator)
    x = torch.cat([images[left], images[right]], dim=-1)
    y = torch.stack([labels[left], labels[right]], dim=1)
    return x, y


def load_digit_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits: images (n x 8 x 8, float32 in [0, 1]) and their digits (int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digit tasks (the default one too) need scikit-learn, for its bundled digits data set: "
            "pip install 'tolaria[train]'"
        ) from exc
    digits = load_digits()
    return torch.tensor(digits.images, dtype=torch.float32) / 16.0, torch.tensor(digits.target, dtype=torch.int64)


def load_pairs(cfg: DigitsTaskConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Train and test pairs: ((x, y), (x, y)), x in [0, 1], float32, y int64 of shape (n, 2)."""
    images, labels = load_digit_images()
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(images), generator=gen)
    n_test = int(round(cfg.test_fraction * len(images)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    train = make_pairs(images[train_idx], labels[train_idx], cfg.train_pairs, gen)
    test = make_pairs(images[test_idx], labels[test_idx], cfg.test_pairs, gen)
    return train, test


class ShuffledBatches:
    """Minibatches ``(x, y)`` of in-memory tensors, reshuffled every epoch.

    Cheaper than a ``DataLoader`` over a ``TensorDataset`` (one gather per batch instead of one per
    example). ``len()`` is the number of batches per epoch; the last, smaller batch is kept. The
    order of epoch ``e`` depends only on ``(seed, e)`` (the trainer calls :meth:`set_epoch`), so a
    resumed run sees the same batches as an uninterrupted one.

    With ``world_size > 1`` it yields only rank ``rank``'s shard of each epoch's order (as
    ``DistributedSampler`` does: the order is padded by repeating its start to a multiple of the
    world size, then rank ``r`` takes every ``world_size``-th example from ``r``), so every rank has
    the same number of batches; ``batch_size`` is then per rank. See :meth:`for_rank`.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(x) != len(y):
            raise ValueError(f"x and y hold {len(x)} and {len(y)} examples; they must match")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size) with world_size >= 1, got rank {rank}, world_size {world_size}"
            )
        if len(x) < world_size:
            raise ValueError(f"{len(x)} examples cannot give each of {world_size} ranks one")
        self.rank, self.world_size = rank, world_size
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the shuffle of epoch ``epoch``."""
        self.epoch = epoch

    def for_rank(self, rank: int, world_size: int) -> ShuffledBatches:
        """The same batches, sharded for rank ``rank`` of ``world_size`` (the trainer calls this)."""
        return ShuffledBatches(
            self.x, self.y, self.batch_size, seed=self.seed, shuffle=self.shuffle, rank=rank, world_size=world_size
        )

    def _shard_size(self) -> int:
        return -(-len(self.x) // self.world_size)

    def __len__(self) -> int:
        return -(-self._shard_size() // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.x), generator=generator) if self.shuffle else torch.arange(len(self.x))
        if self.world_size > 1:
            total = self._shard_size() * self.world_size
            order = torch.cat([order, order[: total - len(order)]])[self.rank :: self.world_size]
        n = len(order)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.x[idx], self.y[idx]


class TwoDigitNet(nn.Module):
    """A shared MLP trunk and one 10-way head per digit position; returns ``{"left", "right"}`` logits."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 16, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleDict({task: nn.Linear(hidden, 10) for task in TASKS})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {task: head(z) for task, head in self.heads.items()}


def two_digit_loss(outputs: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """One cross-entropy per digit position: the two gradient sources."""
    _, y = batch
    return {task: F.cross_entropy(outputs[task], y[:, i]) for i, task in enumerate(TASKS)}


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> dict[str, float]:
    """Per-task accuracy of ``model`` on pairs ``(x, y)`` (run on the model's device)."""
    device = next(model.parameters()).device
    correct = dict.fromkeys(TASKS, 0)
    for start in range(0, len(x), batch_size):
        out = model(x[start : start + batch_size].to(device))
        target = y[start : start + batch_size]
        for i, task in enumerate(TASKS):
            correct[task] += int((out[task].argmax(dim=1).cpu() == target[:, i]).sum())
    return {f"accuracy/{task}": correct[task] / len(x) for task in TASKS}


@dataclass
class DefaultTask:
    """Everything ``Trainer`` needs for the default task, plus its evaluation."""

    model: TwoDigitNet
    optimizer: torch.optim.Optimizer
    data: ShuffledBatches
    loss_fn: Any
    test: tuple[Tensor, Tensor]
    config: DigitsTaskConfig = field(default_factory=DigitsTaskConfig)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return accuracy(model, *self.test)


def build_default_task(cfg: DigitsTaskConfig | None = None) -> DefaultTask:
    """Data, model (seeded), optimizer and loss of the two-digit task."""
    cfg = cfg or DigitsTaskConfig()
    (x, y), test = load_pairs(cfg)
    torch.manual_seed(cfg.seed)
    model = TwoDigitNet(cfg.hidden)
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    data = ShuffledBatches(x, y, cfg.batch_size, seed=cfg.seed)
    return DefaultTask(model=model, optimizer=optimizer, data=data, loss_fn=two_digit_loss, test=test, config=cfg)


__all__ = [
    "DefaultTask",
    "DigitsTaskConfig",
    "ShuffledBatches",
    "TASKS",
    "TwoDigitNet",
    "accuracy",
    "build_default_task",
    "load_digit_images",
    "load_pairs",
    "make_pairs",
    "two_digit_loss",
]
