"""Runs Trainer scenarios whose checkpoints meet a full disk; prints one JSON line of findings.

Two full disks. A file-size limit (``RLIMIT_FSIZE``), which works everywhere: once lowered, a write
that would grow a file past it fails with EFBIG (SIGXFSZ is ignored, so the write returns an error
rather than killing the process). And, with ``--tmpfs`` (when the test can mount one: as root, or
as root of a user namespace), a real small filesystem as the checkpoint folder, filled up by a
filler file: writes fail with ENOSPC. The disk fills (or frees) from the ``evaluate`` callback,
which runs at each epoch end just before that epoch's checkpoint; the telemetry goes to memory, so
only checkpoint writes meet it. Run as a script by ``test_disk_full.py``: the limit, the signal
disposition and the mount belong to this process alone.
"""

from __future__ import annotations

import errno
import json
import resource
import signal
import subprocess
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


class FileSizeLimit:
    """A 'full disk' as RLIMIT_FSIZE: a checkpoint file may grow to half a committed one's size."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.limit: int | None = None

    def fill(self, committed_nbytes: int) -> None:
        self.limit = self.limit or committed_nbytes // 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, UNLIMITED[1]))

    def free(self) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, UNLIMITED)


class FullTmpfs:
    """A really full disk: a 1 MiB tmpfs as the checkpoint folder, filled by ``FILLER``."""

    FILLER = "filler"

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], check=True)

    def fill(self, committed_nbytes: int) -> None:
        chunk = bytes(4096)
        with open(self.folder / self.FILLER, "ab", buffering=0) as filler:
            try:
                while True:
                    filler.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise

    def free(self) -> None:
        (self.folder / self.FILLER).unlink(missing_ok=True)


def run(root: Path, on_failure: str, max_failures: int, full_epochs: set[int], epochs: int, disk: type) -> dict:
    """One run: the disk is full during the epoch ends in ``full_epochs``."""
    model, optimizer, batches, loss = make_problem()
    config = TrainerConfig(
        epochs=epochs,
        device="cpu",
        run_dir=str(root),
        checkpoint=CheckpointConfig(on_failure=on_failure, max_failures=max_failures),
    )
    sink = MemorySink()
    committed: dict[int, list[torch.Tensor]] = {}
    folder = root / "checkpoints"
    full_disk = disk(folder)
    trainer: Trainer

    def evaluate(_model):
        if trainer.epoch in full_epochs:  # also called once more when a run halts
            full_disk.fill(trainer.state.checkpoints[-1].nbytes)
        else:
            full_disk.free()
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
        full_disk.free()
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    listed = [c["file"] for c in manifest["checkpoints"]]
    outcome["listed_steps"] = [c["step"] for c in manifest["checkpoints"]]
    outcome["listed_files_exist"] = all((folder / name).is_file() for name in listed)
    outcome["unlisted_files"] = sorted(
        p.name for p in folder.iterdir() if p.name not in {*listed, MANIFEST_NAME, ".lock", FullTmpfs.FILLER}
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
        "retry_recovers": ("retry", 3, {1, 2}, 5, FileSizeLimit),
        # full from epoch end 1 on: two failures halt the run
        "retry_halts": ("retry", 2, {1, 2, 3, 4}, 5, FileSizeLimit),
        "halt": ("halt", 3, {1, 2, 3, 4}, 5, FileSizeLimit),
        # reports only, even past max_failures; the disk frees up before the end
        "emit": ("emit", 1, {1, 2, 3}, 5, FileSizeLimit),
    }
    if "--tmpfs" in sys.argv[2:]:  # a real full filesystem: one failure, space again, then full for good
        scenarios["tmpfs"] = ("retry", 2, {1, 3, 4}, 5, FullTmpfs)
    results = {name: run(base / name, *args) for name, args in scenarios.items()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
