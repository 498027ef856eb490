"""One rank of the DDP test, launched by ``torchrun --nproc-per-node 2 lightning_ddp_worker.py OUT STEPS``.

Lightning sees torchrun's environment and joins its gloo group instead of launching processes itself.
Rank r trains on rows r, r + 2, ... of the data set, so the two ranks' batches of step s together are
rows [2 * BATCH * s, 2 * BATCH * (s + 1)): the combined batch the test's single process trains on.
Writes ``OUT/rank<r>.json`` (parameters as ``float.hex``, so equality is bitwise).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import lightning_models as models  # this script's folder is sys.path[0]
import torch
from torch.utils.data import DataLoader, Subset

__all__ = ["main"]


class CountConflicts(L.Callback):
    """Sums the conflicts; moves the module buffer ``seen`` by rank + 1 before each step (DDP's buffer
    broadcast, which the mixin keeps doing, must leave rank 0's everywhere)."""

    def __init__(self, rank: int):
        self.conflicts = 0.0
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.seen += self.rank + 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.conflicts += float(trainer.callback_metrics["tolaria/conflicts"])


def main(out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    data = models.dataset()
    shard = Subset(data, list(range(rank, len(data), world)))
    model = models.TwoHeads(aggregator="pcgrad", shared="trunk")
    if rank == 1:  # DDP must replace these with rank 0's parameters
        with torch.no_grad():
            model.left.bias.add_(1.0)
    model.register_buffer("seen", torch.zeros(1, dtype=torch.float64))
    counter = CountConflicts(rank)
    trainer = models.quiet_trainer(
        strategy="ddp", devices=world, max_steps=steps, use_distributed_sampler=False, callbacks=[counter]
    )
    trainer.fit(model, DataLoader(shard, batch_size=models.BATCH, shuffle=False))
    result = {
        "params": [v.hex() for v in models.flat_params(model).tolist()],
        "global_step": trainer.global_step,
        "conflicts": counter.conflicts,
        "perturbed": rank == 1,
        "seen": model.seen.item(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
