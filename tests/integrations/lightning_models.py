"""The tiny two-head problem the Lightning tests train, and the same steps written by hand.

Importable both as ``tests``' package module and as a top-level module by the torchrun worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tolaria.aggregation import GradientBuffer
from tolaria.integrations.lightning import MultiSourceMixin

__all__ = [
    "BATCH",
    "INIT_SEED",
    "LR",
    "MOMENTUM",
    "SAMPLES",
    "TwoHeads",
    "batches",
    "dataset",
    "flat_params",
    "hand_written",
    "loader",
    "quiet_trainer",
]

SAMPLES, FEATURES, HIDDEN = 32, 5, 7
BATCH = 8
INIT_SEED = 7
LR, MOMENTUM = 0.1, 0.9


def dataset() -> TensorDataset:
    """Two targets that pull the shared trunk in opposite directions, so PCGrad projects."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=g, dtype=torch.float64)
    direction = torch.randn(FEATURES, generator=g, dtype=torch.float64)
    left = x @ direction + 0.1 * torch.randn(SAMPLES, generator=g, dtype=torch.float64)
    right = -0.8 * left + torch.randn(SAMPLES, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.stack([left, right], 1))


def loader(data: TensorDataset | None = None, batch_size: int = BATCH) -> DataLoader:
    return DataLoader(dataset() if data is None else data, batch_size=batch_size, shuffle=False)


def batches(data: TensorDataset, batch_size: int = BATCH) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches the loader gives, epoch after epoch."""
    while True:
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size]


class TwoHeads(MultiSourceMixin, L.LightningModule):
    """A tanh trunk shared by two linear heads, float64, one MSE loss per head."""

    def __init__(self, scheduler: str | None = None, **options):
        super().__init__(**options)
        with torch.random.fork_rng():
            torch.manual_seed(INIT_SEED)
            self.trunk = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh())
            self.left = nn.Linear(HIDDEN, 1)
            self.right = nn.Linear(HIDDEN, 1)
        self.double()
        self.scheduler = scheduler

    def losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {
            "left": F.mse_loss(self.left(h).squeeze(1), y[:, 0]),
            "right": F.mse_loss(self.right(h).squeeze(1), y[:, 1]),
        }

    def training_step(self, batch, batch_idx):
        return self.losses(*batch)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)
        if not self.scheduler:
            return optimizer
        lr = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr, "interval": self.scheduler}}


def quiet_trainer(**options) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **options})


def hand_written(
    model: TwoHeads,
    data: Iterable[tuple[Tensor, Tensor]],
    aggregator,
    *,
    steps: int,
    shared: bool = True,
    accumulate: int = 1,
    clip: float | None = None,
    scheduler_every: int | None = None,
) -> TwoHeads:
    """``steps`` optimizer steps of ``model`` done with GradientBuffer + aggregator, no Lightning; the
    StepLR of ``TwoHeads(scheduler=...)`` steps every ``scheduler_every`` optimizer steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    lr = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5) if scheduler_every else None
    buffer = GradientBuffer(model, num_sources=2, shared=model.trunk if shared else None)
    source = iter(data)
    for step in range(steps):
        buffer.zero_grad()
        for _ in range(accumulate):
            losses = model.losses(*next(source))
            buffer.backward([loss / accumulate for loss in losses.values()])
        buffer.aggregate(aggregator)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if lr is not None and (step + 1) % scheduler_every == 0:
            lr.step()
    return model


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
