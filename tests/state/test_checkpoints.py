"""The durable tier: atomic commits, manifest, checksums, fallback to the previous checkpoint, safe loads."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from tolaria.signals import SharedDeadlineSignal
from tolaria.state import CheckpointError, OptimizerStateError, StateError, StateManager
from tolaria.state.checkpoints import MANIFEST_NAME, CheckpointStore
from tolaria.state.durable_io import new_hasher
from tolaria.state.trees import check_loadable
from tolaria.telemetry import MemorySink, TelemetryEmitter

from .helpers import assert_state_equal, full_state, make_adam, make_model, train_steps


def _manager(root: Path, sink: MemorySink, keep_last: int = 3) -> StateManager:
    return StateManager(root, fast_cache_mb=1, keep_last=keep_last, telemetry=TelemetryEmitter([sink], batch_size=1))


def _train_and_checkpoint(
    manager: StateManager, steps=(1, 2, 3)
) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    model = make_model()
    opt = make_adam(model)
    states = {}
    for step in steps:
        train_steps(model, opt, 1, seed=step)
        manager.checkpoint(step, model, opt, extra={"step": step})
        states[step] = full_state(model, opt)
    return model, opt, states


def _rewrite_committed(manager: StateManager, step: int, data: bytes) -> None:
    """Replaces a committed file and makes the manifest agree with it (as a writer with access could)."""
    store = manager._store
    entries = []
    for e in store.entries:
        if e.step == step:
            (store.root / e.file).write_bytes(data)
            algorithm = e.checksum.split(":")[0]
            hasher = new_hasher(algorithm)
            hasher.update(data)
            digest = f"{algorithm}:{hasher.hexdigest()}"
            e = type(e)(e.step, e.file, len(data), digest, e.sequence, e.created_unix)
        entries.append(e)
    store._write_manifest(entries, store._sequence)
    store._entries = tuple(entries)


@pytest.mark.parametrize("checksum", ["crc32", "sha256", "blake2b"])
def test_commit_layout_keep_last_and_manifest(tmp_path, sink, checksum):
    root = tmp_path / "state"
    with StateManager(
        root, fast_cache_mb=1, keep_last=2, telemetry=TelemetryEmitter([sink], batch_size=1), checksum=checksum
    ) as manager:
        _train_and_checkpoint(manager, steps=(1, 2, 3, 4))
        assert [e.step for e in manager.checkpoints] == [3, 4]
        manager.wait_for_cleanup()
        files = sorted(p.name for p in root.iterdir())
        assert files == [".lock", *sorted(e.file for e in manager.checkpoints), MANIFEST_NAME]
        manifest = json.loads((root / MANIFEST_NAME).read_text())
        assert [c["step"] for c in manifest["checkpoints"]] == [3, 4]
        assert all(c["checksum"].startswith(f"{checksum}:") for c in manifest["checkpoints"])
        assert all(err is None for _, err in manager.verify_checkpoints())
        for entry in manager.checkpoints:  # the streamed checksum is the plain checksum of the whole file
            data = (root / entry.file).read_bytes()
            expected = f"{zlib.crc32(data):08x}" if checksum == "crc32" else hashlib.new(checksum, data).hexdigest()
            assert entry.checksum == f"{checksum}:{expected}"
        assert len(sink.of_kind("state.checkpoint_committed")) == 4


def test_same_step_is_replaced(tmp_path, sink):
    with _manager(tmp_path, sink) as manager:
        model = make_model()
        opt = make_adam(model)
        first = manager.checkpoint(5, model, opt)
        train_steps(model, opt, 1)
        second = manager.checkpoint(5, model, opt)
        expected = full_state(model, opt)
        assert [e.step for e in manager.checkpoints] == [5] and manager.checkpoints[0].file == second.file
        manager.wait_for_cleanup()
        assert not (tmp_path / first.file).exists()
        train_steps(model, opt, 1)
        assert manager.restore_latest(model, opt) == 5
        assert_state_equal(expected, model, opt)


def test_failed_write_leaves_previous_checkpoints_and_no_debris(tmp_path, sink, monkeypatch):
    from tolaria.state import checkpoints as checkpoints_module

    with _manager(tmp_path, sink) as manager:
        model, opt, states = _train_and_checkpoint(manager, steps=(1,))
        manifest_before = (tmp_path / MANIFEST_NAME).read_bytes()
        real_write_all = checkpoints_module._write_all
        calls = []

        def disk_full(file, view):
            calls.append(view.nbytes)
            if len(calls) > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write_all(file, view)

        monkeypatch.setattr(checkpoints_module, "_write_all", disk_full)
        train_steps(model, opt, 1)
        with pytest.raises(CheckpointError, match="step 2.*No space left"):
            manager.checkpoint(2, model, opt)
        monkeypatch.setattr(checkpoints_module, "_write_all", real_write_all)
        assert (tmp_path / MANIFEST_NAME).read_bytes() == manifest_before
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [".lock", MANIFEST_NAME, manager.checkpoints[0].file]
        )
        assert manager.restore_latest(model, opt) == 1
        assert_state_equal(states[1], model, opt)
        manager.checkpoint(2, model, opt)  # and the next write works
        assert [e.step for e in manager.checkpoints] == [1, 2]


def test_manifest_failures_never_leave_it_naming_a_missing_file(tmp_path, sink, monkeypatch):
    from tolaria.state import checkpoints as checkpoints_module

    with _manager(tmp_path, sink) as manager:
        model, opt, states = _train_and_checkpoint(manager, steps=(1,))
        real_fsync_dir, real_replace = checkpoints_module._fsync_dir, os.replace

        def replace_failing_for_manifest(src, dst):
            if str(dst).endswith(MANIFEST_NAME):
                raise OSError(errno.EIO, "I/O error")
            real_replace(src, dst)

        monkeypatch.setattr(checkpoints_module.os, "replace", replace_failing_for_manifest)
        train_steps(model, opt, 1)
        with pytest.raises(CheckpointError, match="committing the checkpoint of step 2.*unchanged"):
            manager.checkpoint(2, model, opt)
        monkeypatch.setattr(checkpoints_module.os, "replace", real_replace)
        assert [e.step for e in manager.checkpoints] == [1]
        assert not list(tmp_path.glob("ckpt-000000000002-*"))

        calls = []

        def fsync_dir_failing_after_manifest(path):
            calls.append(path)
            if len(calls) == 2:  # the first is the data file's rename, the second the manifest's
                raise OSError(errno.EIO, "I/O error")
            real_fsync_dir(path)

        monkeypatch.setattr(checkpoints_module, "_fsync_dir", fsync_dir_failing_after_manifest)
        with pytest.raises(CheckpointError, match="step 2 is in the manifest, but making it durable failed"):
            manager.checkpoint(2, model, opt)
        monkeypatch.setattr(checkpoints_module, "_fsync_dir", real_fsync_dir)
        expected = full_state(model, opt)
        assert [e.step for e in manager.checkpoints] == [1, 2]
        assert all(err is None for _, err in manager.verify_checkpoints())
        train_steps(model, opt, 1)
        assert manager.restore_latest(model, opt) == 2
        assert_state_equal(expected, model, opt)


def test_restore_latest_into_fresh_objects_with_extra(tmp_path, sink):
    random.seed(1)
    extra = {
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "lr_controller": {"last_step": 12, "base_lrs": [0.1, 0.01], "warmup": True},
        "counters": {"step": 12, "epoch": 1, "samples": 1536},
    }
    with _manager(tmp_path, sink) as manager:
        model = make_model()
        opt = make_adam(model)
        train_steps(model, opt, 2)
        manager.checkpoint(12, model, opt, extra=extra)
        expected = full_state(model, opt)
    with _manager(tmp_path, sink) as manager:  # a new process after a crash, say
        fresh = make_model(seed=9)
        fresh_opt = make_adam(fresh)
        restored = manager.restore_latest_with_extra(fresh, fresh_opt)
        assert restored.step == 12 and manager.last_restored_step == 12
        assert_state_equal(expected, fresh, fresh_opt)
        got = manager.last_restored_extra
        assert torch.equal(got["torch_rng"], extra["torch_rng"])
        random.setstate(got["python_rng"])  # a tuple of ints, as random.setstate needs
        assert got["lr_controller"] == extra["lr_controller"] and got["counters"] == extra["counters"]
        train_steps(fresh, fresh_opt, 1)  # the optimizer works on from the restored state


def test_every_value_kind_check_loadable_accepts_round_trips(tmp_path, sink):
    extra = {
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "complex": 1 + 2j,
        "bytes": b"xy",
        "none": None,
        "nested": (1, [2.5, "s"], {3: True}),
        "ordered": OrderedDict(a=1),
        4: "int key",
        1.5: "float key",
        None: 0,
        False: 1,
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    check_loadable(extra)
    with _manager(tmp_path, sink) as manager:
        model = make_model()
        opt = make_adam(model)
        manager.checkpoint(1, model, opt, extra=extra)
        manager.restore_latest(model, opt)
        got = manager.last_restored_extra
    assert got.keys() == extra.keys()
    for key, value in extra.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value) and got[key].dtype == value.dtype
        else:
            assert got[key] == value and type(got[key]) is type(value), key


def test_extra_that_cannot_load_safely_is_refused_before_writing(tmp_path, sink):
    with _manager(tmp_path, sink) as manager:
        model = make_model()
        opt = make_adam(model)
        manager.checkpoint(1, model, opt)
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(TypeError, match=r"\['extra'\]\['sched'\].*weights_only"):
            manager.checkpoint(2, model, opt, extra={"sched": object()})
        with pytest.raises(TypeError, match="key"):
            manager.checkpoint(2, model, opt, extra={("a", 1): 1})
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert [e.step for e in manager.checkpoints] == [1]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "garbage"])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, sink, caplog, damage):
    with _manager(tmp_path, sink) as manager:
        model, opt, states = _train_and_checkpoint(manager)
        newest = tmp_path / manager.checkpoints[-1].file
        expected_text = {
            "flip": "checksum mismatch",
            "truncate": "truncated",
            "delete": "the file is missing",
            "garbage": "unreadable by torch.load",
        }[damage]
        if damage == "flip":
            data = bytearray(newest.read_bytes())
            data[len(data) // 2] ^= 0x01
            newest.write_bytes(bytes(data))
        elif damage == "truncate":
            with open(newest, "r+b") as f:
                f.truncate(newest.stat().st_size // 3)
        elif damage == "delete":
            newest.unlink()
        else:  # a file whose checksum is right but whose content is no checkpoint at all
            _rewrite_committed(manager, 3, b"PK\x03\x04" + os.urandom(4096))
        train_steps(model, opt, 1, seed=99)
        with caplog.at_level(logging.ERROR, logger="tolaria.state"):
            assert manager.restore_latest(model, opt) == 2
        assert_state_equal(states[2], model, opt)
        assert manager.last_restored_extra == {"step": 2}
        invalid = sink.of_kind("state.checkpoint_invalid")
        assert len(invalid) == 1 and invalid[0]["step"] == 3 and expected_text in invalid[0]["message"]
        assert expected_text in caplog.text


def test_no_valid_checkpoint_raises_with_every_reason(tmp_path, sink):
    with _manager(tmp_path, sink) as manager:
        model, opt, _ = _train_and_checkpoint(manager, steps=(1, 2))
        (tmp_path / manager.checkpoints[0].file).unlink()
        with open(tmp_path / manager.checkpoints[1].file, "r+b") as f:
            f.truncate(10)
        before = full_state(model, opt)
        with pytest.raises(CheckpointError) as info:
            manager.restore_latest(model, opt)
        message = str(info.value)
        assert "verifies" in message and "step 1" in message and "missing" in message
        assert "step 2" in message and "truncated" in message
        assert_state_equal(before, model, opt)


def test_empty_folder_raises(tmp_path, sink):
    with _manager(tmp_path, sink) as manager:
        model = make_model()
        with pytest.raises(CheckpointError, match="no committed checkpoint"):
            manager.restore_latest(model, make_adam(model))


class _Exploit:
    """Unpickling this calls Path.touch(marker): code from the file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _zip_checkpoint_with(pickled: bytes) -> bytes:
    """A file in torch.save's zip layout whose data.pkl is ``pickled``."""
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return buffer.getvalue()


@pytest.mark.parametrize("layout", ["zip", "raw-pickle"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, sink, layout):
    marker = tmp_path / "pwned"
    pickled = pickle.dumps({"format": "tolaria.checkpoint/1", "step": 3, "model": _Exploit(marker)}, protocol=2)
    probe = tmp_path / "probe"  # the payload really is dangerous: plain pickle runs it
    pickle.loads(pickle.dumps(_Exploit(probe), protocol=2))
    assert probe.exists()
    data = _zip_checkpoint_with(pickled) if layout == "zip" else pickled
    with _manager(tmp_path / "state", sink) as manager:
        model, opt, states = _train_and_checkpoint(manager)
        _rewrite_committed(manager, 3, data)
        assert all(err is None for _, err in manager.verify_checkpoints())  # the checksum is fine
        assert manager.restore_latest(model, opt) == 2
        assert_state_equal(states[2], model, opt)
        (refusal,) = sink.of_kind("state.checkpoint_invalid")
        assert refusal["step"] == 3 and "refused" in refusal["message"]
        assert ("weights_only" if layout == "zip" else "not a torch.save zip archive") in refusal["message"]
    assert not marker.exists()


def test_optimizer_mismatch_raises_and_leaves_everything_untouched(tmp_path, sink):
    with _manager(tmp_path, sink) as manager:
        model, opt, _ = _train_and_checkpoint(manager, steps=(1,))
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train_steps(model, sgd, 1)
        before = full_state(model, sgd)
        with pytest.raises(OptimizerStateError, match="saved from torch.optim.adam.Adam"):
            manager.restore_latest(model, sgd)
        assert_state_equal(before, model, sgd)
        # A checkpoint that does not fit is not "bad": nothing falls back to an older one silently.
        assert not sink.of_kind("state.checkpoint_invalid")


def test_optimizer_state_that_does_not_load_raises(tmp_path, sink):
    with _manager(tmp_path, sink) as manager:
        model, opt, _ = _train_and_checkpoint(manager, steps=(1,))
        other = make_model()
        other_opt = make_adam(other)

        def refuse(state_dict):
            raise RuntimeError("state of an incompatible build")

        other_opt.load_state_dict = refuse  # fresh state, so the load goes through load_state_dict
        before = full_state(other, other_opt)
        with pytest.raises(OptimizerStateError, match="did not load.*incompatible build"):
            manager.restore_latest(other, other_opt)
        assert_state_equal(before, other, other_opt)


def test_leftovers_of_an_interrupted_write_are_removed_and_reported(tmp_path, sink):
    with _manager(tmp_path, sink) as manager:
        _train_and_checkpoint(manager, steps=(1,))
    (tmp_path / ".tmp-ckpt-000000000002-00000002.pt").write_bytes(b"half")
    (tmp_path / "ckpt-000000000002-00000002.pt").write_bytes(b"renamed, never committed")
    (tmp_path / "notes.txt").write_text("not ours")
    with _manager(tmp_path, sink) as manager:
        assert [e.step for e in manager.checkpoints] == [1]
        (event,) = sink.of_kind("state.leftovers_removed")
        assert sorted(event["files"]) == [".tmp-ckpt-000000000002-00000002.pt", "ckpt-000000000002-00000002.pt"]
    assert (tmp_path / "notes.txt").exists() and not (tmp_path / "ckpt-000000000002-00000002.pt").exists()


def test_corrupt_manifest_refuses_to_open(tmp_path, sink):
    with _manager(tmp_path, sink) as manager:
        _train_and_checkpoint(manager, steps=(1, 2))
    manifest = tmp_path / MANIFEST_NAME
    text = manifest.read_text()
    manifest.write_text(text.replace('"step": 2', '"step": 7'))
    with pytest.raises(CheckpointError, match="manifest .* corrupt.*digest"):
        _manager(tmp_path, sink)
    manifest.write_text(text)
    with _manager(tmp_path, sink) as manager:  # the failed open released the folder
        assert [e.step for e in manager.checkpoints] == [1, 2]


def test_one_manager_per_folder_and_signal_lifetime(tmp_path, sink):
    manager = _manager(tmp_path, sink)
    name = manager.deadline_signal.name
    assert SharedDeadlineSignal.attach(name).read().is_set is False
    with pytest.raises(StateError, match="in use by another StateManager"):
        _manager(tmp_path, sink)
    manager.close()
    manager.close()  # idempotent
    with pytest.raises(FileNotFoundError):
        SharedDeadlineSignal.attach(name)
    with pytest.raises(StateError, match="closed"):
        _ = manager.checkpoints
    _manager(tmp_path, sink).close()


@pytest.mark.parametrize("checksum", ["crc32", "sha256"])
def test_each_checksum_detects_corruption(tmp_path, sink, checksum):
    with StateManager(
        tmp_path, fast_cache_mb=1, keep_last=3, telemetry=TelemetryEmitter([sink], batch_size=1), checksum=checksum
    ) as manager:
        model, opt, states = _train_and_checkpoint(manager, steps=(1, 2))
        assert all(e.checksum.startswith(f"{checksum}:") for e in manager.checkpoints)
        newest = tmp_path / manager.checkpoints[-1].file
        data = bytearray(newest.read_bytes())
        data[-200] ^= 0x10
        newest.write_bytes(bytes(data))
        assert manager.restore_latest(model, opt) == 1
        assert_state_equal(states[1], model, opt)
        (invalid,) = sink.of_kind("state.checkpoint_invalid")
        assert "checksum mismatch" in invalid["message"] and f"{checksum}:" in invalid["message"]


def test_store_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointStore(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="checksum"):
        CheckpointStore(tmp_path, keep_last=1, checksum="nope")
