"""Runs Trainer scenarios whose checkpoints meet a full disk; prints one JSON line of findings.

A file-size limit (``RLIMIT_FSIZE``) stands in for a full disk: once lowered, a write that would
grow a file past it fails with EFBIG (SIGXFSZ is ignored, so the write returns an error rather than
killing the process), just as a write to a full filesystem fails with ENOSPC. It is lowered from
the ``evaluate`` callback, which runs at each epoch end just before that epoch's checkpoint; the
telemetry goes to memory, so the limit hits checkpoint writes only. Run as a script by
``test_disk_full.py``: the limit and the signal disposition belong to this process alone.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path

import torch

from tolaria.state import StateManager
from tolaria.state.checkpoints import MANIFEST_NAME
from tolaria.telemetry import MemorySink, TelemetryEmitter
from tolaria.trainer import CheckpointConfig, Trainer, TrainerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: tests/ holds the package
from trainer.helpers import make_problem  # noqa: E402

UNLIMITED = resource.getrlimit(resource.RLIMIT_FSIZE)


def _tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Copies of the model's and the optimizer's tensors."""
    tensors = list(model.state_dict().values())
    for state in optimizer.state.values():
        tensors.extend(v for _, v in sorted(state.items()) if isinstance(v, torch.Tensor))
    return [t.detach().clone() for t in tensors]


def _bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype
        and x.shape == y.shape
        and x.contiguous().view(torch.uint8).equal(y.contiguous().view(torch.uint8))
        for x, y in zip(a, b)
    )


def run(root: Path, on_failure: str, max_failures: int, full_epochs: set[int], epochs: int) -> dict:
    """One run: the disk is 'full' during the epoch ends in ``full_epochs``."""
    model, optimizer, batches, loss = make_problem()
    config = TrainerConfig(
        epochs=epochs,
        device="cpu",
        run_dir=str(root),
        checkpoint=CheckpointConfig(on_failure=on_failure, max_failures=max_failures),
    )
    sink = MemorySink()
    committed: dict[int, list[torch.Tensor]] = {}
    epoch_ends = iter(range(epochs))
    limit: list[int] = []
    trainer: Trainer

    def evaluate(_model):
        epoch = next(epoch_ends)
        if epoch in full_epochs:
            if not limit:  # a checkpoint file gets at most half a committed one's size
                limit.append(trainer.state.checkpoints[-1].nbytes // 2)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit[0], UNLIMITED[1]))
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, UNLIMITED)
        committed[trainer.step] = _tensors(trainer.model, trainer.optimizer)  # what this epoch's checkpoint holds
        return {}

    trainer = Trainer(model, optimizer, batches, loss, config, telemetry=TelemetryEmitter([sink]), evaluate=evaluate)
    try:
        summary = trainer.fit()
        outcome = {"status": summary.status, "last_checkpoint_step": summary.last_checkpoint_step}
        outcome["halt_reason"] = summary.halt_reason
    except Exception as exc:  # the test asserts on this: a crash must never happen
        outcome = {"status": "raised", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, UNLIMITED)
    folder = root / "checkpoints"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    listed = [c["file"] for c in manifest["checkpoints"]]
    outcome["listed_steps"] = [c["step"] for c in manifest["checkpoints"]]
    outcome["listed_files_exist"] = all((folder / name).is_file() for name in listed)
    outcome["unlisted_files"] = sorted(
        p.name for p in folder.iterdir() if p.name not in {*listed, MANIFEST_NAME, ".lock"}
    )
    outcome["failed"] = [e["message"] for e in sink.of_kind("train.checkpoint_failed")]
    outcome["halting"] = [e["halting"] for e in sink.of_kind("train.checkpoint_failed")]
    outcome["recovered"] = len(sink.of_kind("train.checkpoint_recovered"))
    outcome["steps_per_epoch"] = len(batches)
    # The newest committed checkpoint restores bit for bit into fresh objects.
    fresh_model, fresh_optimizer, _, _ = make_problem(seed=1)
    with StateManager(folder, fast_cache_mb=1, keep_last=3) as manager:
        restored = manager.restore_latest(fresh_model, fresh_optimizer)
    outcome["restored_step"] = restored
    outcome["restored_bitwise"] = _bitwise_equal(committed[restored], _tensors(fresh_model, fresh_optimizer))
    return outcome


def main() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
    base = Path(sys.argv[1])
    scenarios = {
        # full at epoch ends 1 and 2, free again at 3: two failures, then the retry commits
        "retry_recovers": ("retry", 3, {1, 2}, 5),
        # full from epoch end 1 on: two failures halt the run
        "retry_halts": ("retry", 2, {1, 2, 3, 4}, 5),
        "halt": ("halt", 3, {1, 2, 3, 4}, 5),
        # reports only, even past max_failures; the disk frees up before the end
        "emit": ("emit", 1, {1, 2, 3}, 5),
    }
    results = {name: run(base / name, *args) for name, args in scenarios.items()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
