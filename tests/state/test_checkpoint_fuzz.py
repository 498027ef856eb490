"""Fuzzed and hostile checkpoint files (issue 18): bytes flipped at 200 random offsets, truncations,
forged checksums, a pickle that calls ``os.system``. Loading never runs code and never fails with
anything but a :class:`CheckpointError` naming the file; a resume falls back to the previous
checkpoint, bit for bit. The randomised cases run 20 seeded repetitions each."""

from __future__ import annotations

import io
import os
import pickle
import random
import shlex
import zipfile
from pathlib import Path

import pytest
import torch

from tolaria.state import CheckpointError, StateManager
from tolaria.state.checkpoints import CheckpointStore
from tolaria.state.durable_io import new_hasher
from tolaria.telemetry import MemorySink, TelemetryEmitter
from tolaria.trainer import CheckpointConfig, Trainer, TrainerConfig

from .helpers import assert_state_equal, full_state, make_adam, make_model, train_steps

REPETITIONS = 20
FLIPS = 200


class _SystemCall:
    """Unpickling this runs ``os.system(command)``: a GLOBAL opcode naming ``posix.system``, then REDUCE."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _touch(marker: Path) -> _SystemCall:
    return _SystemCall(f"touch {shlex.quote(str(marker))}")


def _forge(store: CheckpointStore, step: int, data: bytes) -> None:
    """Writes ``data`` as the committed file of ``step`` with a recomputed checksum and manifest, as
    an attacker with write access to the folder could."""
    entries = []
    for entry in store.entries:
        if entry.step == step:
            (store.root / entry.file).write_bytes(data)
            algorithm = entry.checksum.split(":")[0]
            hasher = new_hasher(algorithm)
            hasher.update(data)
            entry = type(entry)(step, entry.file, len(data), f"{algorithm}:{hasher.hexdigest()}", entry.sequence, 0.0)
        entries.append(entry)
    store._write_manifest(entries, store._sequence)
    store._entries = tuple(entries)


def _flip(data: bytes, rng: random.Random, count: int, within: range | None = None) -> bytes:
    out = bytearray(data)
    for offset in rng.sample(within or range(len(out)), count):
        out[offset] ^= rng.randrange(1, 256)
    return bytes(out)


def _pickle_range(data: bytes) -> range:
    """Where data.pkl's bytes lie in a torch.save archive (stored, not compressed)."""
    (info,) = [i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if i.filename.endswith("/data.pkl")]
    assert info.compress_type == zipfile.ZIP_STORED
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    return range(start, start + info.file_size)


@pytest.fixture
def committed(tmp_path):
    """A folder with checkpoints of steps 1 and 2; yields the manager, the states, and step 2's bytes."""
    sink = MemorySink()
    with StateManager(tmp_path, fast_cache_mb=1, keep_last=3, telemetry=TelemetryEmitter([sink], batch_size=1)) as m:
        model = make_model()
        optimizer = make_adam(model)
        states = {}
        for step in (1, 2):
            train_steps(model, optimizer, 1, seed=step)
            m.checkpoint(step, model, optimizer, extra={"step": step})
            states[step] = full_state(model, optimizer)
        yield m, model, optimizer, states, sink


def _outcome(store: CheckpointStore, entry) -> str:
    """``"loaded"`` or ``"CheckpointError"``; any other exception fails the test (it propagates)."""
    try:
        payload = store.load(entry)
    except CheckpointError as exc:
        assert str(store.root / entry.file) in str(exc), exc  # the error names the file
        return "CheckpointError"
    assert payload["format"] == "tolaria.checkpoint/1" and payload["step"] == entry.step
    return "loaded"


def test_flips_and_truncations_are_caught_by_the_checksum_and_resume_falls_back(committed):
    manager, model, optimizer, states, sink = committed
    store = manager._store
    newest = store.entries[-1]
    path = store.root / newest.file
    original = path.read_bytes()
    for seed in range(REPETITIONS):
        rng = random.Random(seed)
        for damage in ("flip", "truncate"):
            if damage == "flip":
                path.write_bytes(_flip(original, rng, FLIPS))
                expected = "checksum mismatch"
            else:
                path.write_bytes(original[: rng.randrange(len(original))])
                expected = "truncated"
            with pytest.raises(CheckpointError, match=expected) as info:
                store.load(newest)
            assert str(path) in str(info.value)
            train_steps(model, optimizer, 1, seed=100 + seed)
            assert manager.restore_latest(model, optimizer) == 1  # the previous one, bit for bit
            assert_state_equal(states[1], model, optimizer)
    invalid = sink.of_kind("state.checkpoint_invalid")
    assert len(invalid) == 2 * REPETITIONS and all(e["file"] == newest.file and e["step"] == 2 for e in invalid)
    path.write_bytes(original)  # and the intact file is used again
    assert manager.restore_latest(model, optimizer) == 2
    assert_state_equal(states[2], model, optimizer)


@pytest.mark.parametrize("where", ["anywhere", "pickle"])
def test_forged_checksums_never_run_code_or_escape_as_another_error(committed, where):
    """With the checksum recomputed the file's content reaches torch.load: 200 flips anywhere, or
    1-3 flips in the pickle (which parses, to an unpickler error or an altered value)."""
    manager, model, optimizer, states, _ = committed
    store = manager._store
    original = (store.root / store.entries[-1].file).read_bytes()
    outcomes = []
    for seed in range(REPETITIONS):
        rng = random.Random(seed)
        if where == "anywhere":
            data = _flip(original, rng, FLIPS)
        else:
            data = _flip(original, rng, rng.randint(1, 3), within=_pickle_range(original))
        _forge(store, 2, data)
        outcomes.append(_outcome(store, store.entries[-1]))
    if where == "anywhere":  # 200 flips in a 10 kB archive always break its structure
        assert outcomes == ["CheckpointError"] * REPETITIONS
    else:  # a forged value that still parses loads: the checksum was the defence, and it was forged
        assert set(outcomes) <= {"CheckpointError", "loaded"}


def test_a_pickle_calling_os_system_is_refused_and_never_runs(committed, tmp_path):
    manager, model, optimizer, states, sink = committed
    store = manager._store
    probe = tmp_path / "probe"  # the payload is really dangerous: a plain unpickler runs it
    pickle.loads(pickle.dumps(_touch(probe), protocol=2))
    assert probe.exists()
    marker = tmp_path / "marker"
    payloads = {}
    buffer = io.BytesIO()  # a valid torch.save archive: the checkpoint's layout, a hostile extra
    torch.save(
        {
            "format": "tolaria.checkpoint/1",
            "step": 2,
            "model": {},
            "optimizer": {},
            "meta": {},
            "extra": _touch(marker),
        },
        buffer,
    )
    payloads["torch.save zip"] = buffer.getvalue()
    assert b"posix\nsystem" in payloads["torch.save zip"]  # a GLOBAL naming os.system, in a valid archive
    payloads["raw pickle"] = pickle.dumps({"format": "tolaria.checkpoint/1", "extra": _touch(marker)}, protocol=2)
    for layout, data in payloads.items():
        _forge(store, 2, data)
        assert all(error is None for _, error in manager.verify_checkpoints()), layout  # the checksum is right
        with pytest.raises(CheckpointError, match="refused") as info:
            store.load(store.entries[-1])
        assert str(store.root / store.entries[-1].file) in str(info.value)
        assert manager.restore_latest(model, optimizer) == 1
        assert_state_equal(states[1], model, optimizer)
        assert not marker.exists(), layout


def test_trainer_resume_falls_back_past_a_hostile_newest_checkpoint(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(6, 8) for _ in range(4)]

    def loss(outputs, batch):
        return outputs.pow(2).mean()

    at_epoch_end: list[dict] = []

    def build(epochs: int, resume: bool, **kw) -> Trainer:
        model = make_model()
        config = TrainerConfig(
            epochs=epochs, device="cpu", run_dir=str(tmp_path / "run"), checkpoint=CheckpointConfig(resume=resume)
        )
        return Trainer(model, make_adam(model), batches, loss, config, **kw)

    def remember(model):
        at_epoch_end.append(full_state(model, first.optimizer))
        return {}

    first = build(2, False, evaluate=remember)
    assert first.fit().last_checkpoint_step == 8
    store = CheckpointStore(tmp_path / "run" / "checkpoints", keep_last=3)
    newest = store.entries[-1]
    marker = tmp_path / "marker"
    hostile = io.BytesIO()
    torch.save(
        {
            "format": "tolaria.checkpoint/1",
            "step": 8,
            "model": {},
            "optimizer": {},
            "meta": {},
            "extra": _touch(marker),
        },
        hostile,
    )
    _forge(store, newest.step, hostile.getvalue())
    store.close()

    sink = MemorySink()
    second = build(3, True, telemetry=TelemetryEmitter([sink]))
    try:
        assert second._resume() == 4  # the previous checkpoint (end of epoch 1), bit for bit
        assert_state_equal(at_epoch_end[0], second.model, second.optimizer)
    finally:
        second.close()
    assert not marker.exists()
    [invalid] = sink.of_kind("state.checkpoint_invalid")
    assert invalid["file"] == newest.file and "refused" in invalid["message"] and newest.file in invalid["message"]
