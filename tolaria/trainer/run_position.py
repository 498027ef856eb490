"""Where a run is, beyond the model and optimizer: its place in the data and its random states.

A resumed run repeats the uninterrupted one bit for bit only if it starts from the same batch with
the same random draws ahead of it. Every checkpoint's ``extra`` therefore carries, under
``"position"``:

- ``batches``: the batches of the current epoch already used by a step (skipped and rolled-back
  steps included: they consumed their batch too). A checkpoint taken mid-epoch resumes by skipping
  exactly that many batches of the epoch's iterator.
- ``rng``: every rank's random states (torch on the CPU and on each initialised CUDA device,
  NumPy's global generator, Python's ``random``, and the data loader's own generator if it has one),
  each twice: at the start of the epoch, before its iterator was made, and at the checkpoint.
  Replaying the epoch's start state before making the iterator gives the same shuffle (a plain
  ``DataLoader`` draws its shuffle and worker seeds from the global generator when iterated); the
  checkpoint state is restored once the used batches are skipped. Ranks draw differently (their
  shards differ), so each keeps its own: they are all-gathered to rank 0, which writes them.

The states are JSON-able (hex strings and lists of ints), so the checkpoint loads with
``weights_only=True`` and the gather needs no pickle. A checkpoint without a position (written
before it existed) or from another world size resumes at the start of its epoch / without the RNG
states, said in a ``train.position_missing`` warning event.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tolaria.distributed import all_gather_json
from tolaria.state import CheckpointError

if TYPE_CHECKING:
    from .loop import Trainer

__all__ = [
    "POSITION_KEY",
    "PendingResume",
    "capture_rng",
    "epoch_iterator",
    "position_extra",
    "restore_position",
    "restore_rng",
]

log = logging.getLogger("tolaria.trainer")

POSITION_KEY = "position"


def _data_generator(data: Any) -> torch.Generator | None:
    """The generator a data loader draws its shuffle / worker seeds from, when it has its own."""
    loader = getattr(data, "loader", data)  # a ShardedLoader wraps its DataLoader
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def capture_rng(data: Any = None) -> dict[str, Any]:
    """This process's random states, JSON-able (``data``: the run's data, for its loader's generator)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().numpy().tobytes().hex(),
        "python": _python_state(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
    numpy_state = _numpy_state()
    if numpy_state is not None:
        state["numpy"] = numpy_state
    generator = _data_generator(data)
    if generator is not None:
        state["data_generator"] = generator.get_state().numpy().tobytes().hex()
    return state


def restore_rng(state: Mapping[str, Any], data: Any = None) -> None:
    """Sets this process's random states to ``state`` (from :func:`capture_rng`)."""
    torch.set_rng_state(_byte_tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np

        saved = state["numpy"]
        keys = np.asarray(saved["keys"], dtype=np.uint32)
        np.random.set_state((saved["kind"], keys, int(saved["pos"]), int(saved["has_gauss"]), float(saved["gauss"])))
    generator = _data_generator(data)
    if generator is not None and "data_generator" in state:
        generator.set_state(_byte_tensor(state["data_generator"]))


def _byte_tensor(hex_text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(bytes.fromhex(hex_text)), dtype=torch.uint8).clone()


def _python_state(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _numpy_state() -> dict[str, Any] | None:
    try:
        import numpy as np
    except ImportError:  # NumPy is optional for the trainer: no NumPy, no NumPy state to keep
        return None
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def position_extra(trainer: Trainer) -> dict[str, Any]:
    """The ``"position"`` entry of a checkpoint's extra (a collective: every rank calls it)."""
    mine = {"epoch_start": trainer._epoch_start_rng, "now": capture_rng(trainer.data)}
    return {POSITION_KEY: {"batches": trainer._batches_used, "rng": all_gather_json(mine, trainer.ctx)}}


@dataclass(frozen=True)
class PendingResume:
    """A mid-epoch resume not yet applied: the epoch's first ``batches`` batches are skipped when its
    iterator is made, between the two random states."""

    batches: int
    epoch_start_rng: dict[str, Any] | None
    rng: dict[str, Any] | None


def restore_position(trainer: Trainer, extra: Mapping[str, Any], *, epoch_complete: bool) -> None:
    """Applies a checkpoint's position: the random states now (a completed epoch), or on the next
    epoch's iterator (:func:`epoch_iterator`, mid-epoch)."""
    where = f"the checkpoint of step {trainer.step}"
    position = extra.get(POSITION_KEY)
    rank_states = None
    if not isinstance(position, Mapping):
        _missing(trainer, f"{where} holds no data position or random states (written by an older Tolaria)")
        batches = 0
    else:
        batches = int(position["batches"])
        states = position["rng"]
        if len(states) == trainer.ctx.world_size:
            rank_states = states[trainer.ctx.rank]
        else:
            _missing(
                trainer,
                f"{where} holds the random states of {len(states)} rank(s), this run has {trainer.ctx.world_size}",
            )
    if epoch_complete:
        if rank_states is not None:
            restore_rng(rank_states["now"], trainer.data)
        return
    if not isinstance(position, Mapping):
        _missing(trainer, f"{where} was taken mid-epoch; epoch {trainer.epoch + 1} restarts from its first batch")
    trainer._pending_resume = PendingResume(
        batches,
        rank_states["epoch_start"] if rank_states else None,
        rank_states["now"] if rank_states else None,
    )


def _missing(trainer: Trainer, message: str) -> None:
    message = f"{message}; the resumed run may not repeat the uninterrupted one bit for bit"
    log.warning(message)
    trainer.telemetry.event("train.position_missing", severity="warning", message=message)


def epoch_iterator(trainer: Trainer, batches: Iterable[Any]) -> tuple[Iterator[Any], int]:
    """The iterator of this epoch's batches and how many were skipped (a pending mid-epoch resume).

    Records the random states at the epoch's start (for the checkpoints of this epoch) before the
    iterator is made, which may draw from them.
    """
    pending, trainer._pending_resume = trainer._pending_resume, None
    if pending is None or pending.epoch_start_rng is None:
        trainer._epoch_start_rng = capture_rng(trainer.data)
    else:
        restore_rng(pending.epoch_start_rng, trainer.data)
        trainer._epoch_start_rng = pending.epoch_start_rng
    iterator = iter(batches)
    skip = 0 if pending is None else pending.batches
    for done in range(skip):
        try:
            next(iterator)
        except StopIteration:
            raise CheckpointError(
                f"the checkpoint of step {trainer.step} was taken after batch {skip} of epoch "
                f"{trainer.epoch + 1}, but this run's data has only {done} batch(es) in that epoch: the data "
                "changed since the checkpoint; resume with the same data"
            ) from None
    if pending is not None and pending.rng is not None:
        restore_rng(pending.rng, trainer.data)
    return iterator, skip
