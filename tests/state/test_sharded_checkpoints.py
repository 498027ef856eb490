"""ShardedCheckpointStore in one process (DCP without a process group): commit, fallback, refusals.

The 4-rank write and 2-rank resume are in tests/distributed/test_sharded_checkpoints.py; here the
integrity and safety rules, which do not depend on the number of ranks.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from tolaria.state import CheckpointError, StateMismatchError
from tolaria.state.durable_io import manifest_digest
from tolaria.state.sharded_checkpoints import ShardedCheckpointStore
from tolaria.telemetry import MemorySink, TelemetryEmitter

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()


def _trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    net = _net(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for step in range(2):
        optimizer.zero_grad()
        net(torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))).sum().backward()
        optimizer.step()
    return net, optimizer


def _values(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    moments = [state[k] for state in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return [p.detach().clone() for p in net.parameters()] + [m.clone() for m in moments]


def _assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _store(root: Path, sink: MemorySink | None = None, keep_last: int = 3) -> ShardedCheckpointStore:
    telemetry = TelemetryEmitter([sink or MemorySink()], batch_size=1)
    return ShardedCheckpointStore(root, keep_last=keep_last, telemetry=telemetry)


def _rewrite_manifest(root: Path, folder: str, name: str) -> None:
    """What an attacker who can also write the manifest does: record the tampered file's checksum."""
    from tolaria.state.sharded_checkpoints import _hash_file

    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["checkpoints"]:
        if entry["dir"] == folder:
            digest, nbytes = _hash_file(root / folder / name, "crc32")
            entry["files"][name] = [nbytes, digest]
    body = {k: v for k, v in manifest.items() if k != "digest"}
    (root / "manifest.json").write_text(json.dumps({**body, "digest": manifest_digest(body)}))


def test_round_trip_keep_last_and_leftovers(tmp_path):
    net, optimizer = _trained()
    sink = MemorySink()
    store = _store(tmp_path, sink, keep_last=2)
    for step in (1, 2, 3):
        entry = store.write(step, net, optimizer, extra={"epoch": step, "generator": torch.arange(3)})
    assert [e.step for e in store.entries] == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [*(e.dir for e in store.entries), "manifest.json"]
    assert set(entry.files) == {".metadata", "__0_0.distcp", "extra.pt"} and entry.world_size == 1
    expected = _values(net, optimizer)

    (tmp_path / ".tmp-ckpt-000000000004-00000004").mkdir()  # a crash mid-write
    fresh, fresh_optimizer = _net(1), None
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.5)
    restored = _store(tmp_path, sink).load_newest(fresh, fresh_optimizer)
    assert (restored.step, restored.extra["epoch"]) == (3, 3)
    assert torch.equal(restored.extra["generator"], torch.arange(3))
    _assert_equal(_values(fresh, fresh_optimizer), expected)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.01
    assert not (tmp_path / ".tmp-ckpt-000000000004-00000004").exists()
    assert len(sink.of_kind("state.leftovers_removed")) == 1


def test_a_corrupt_newest_checkpoint_is_refused_and_the_previous_used(tmp_path):
    net, optimizer = _trained()
    sink = MemorySink()
    store = _store(tmp_path, sink)
    store.write(1, net, optimizer, extra={"epoch": 1})
    expected = _values(net, optimizer)
    optimizer.step()  # the grads are still there: the state moves on
    newest = store.write(2, net, optimizer, extra={"epoch": 2})
    data = tmp_path / newest.dir / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-7])  # truncated

    fresh = _net(1)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.01)
    restored = store.load_newest(fresh, fresh_optimizer)
    assert restored.step == 1
    _assert_equal(_values(fresh, fresh_optimizer), expected)
    (invalid,) = sink.of_kind("state.checkpoint_invalid")
    assert "checkpoint of step 2" in invalid["message"] and "__0_0.distcp" in invalid["message"]

    first = tmp_path / store.entries[0].dir / ".metadata"
    first.write_bytes(first.read_bytes().replace(b"Metadata", b"Metadatb", 1))  # same size, another checksum
    with pytest.raises(CheckpointError, match=r"no committed sharded checkpoint .* verifies: .*step 2.*step 1"):
        store.load_newest(fresh, fresh_optimizer)


class _RunsCode:
    def __reduce__(self):
        return (os.makedirs, ("PWNED",))


def test_a_metadata_pickle_that_runs_code_is_refused_even_with_a_matching_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net, optimizer = _trained()
    root = tmp_path / "ckpt"
    store = _store(root)
    entry = store.write(1, net, optimizer)
    (root / entry.dir / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    _rewrite_manifest(root, entry.dir, ".metadata")
    before = _values(net, optimizer)
    with pytest.raises(CheckpointError, match=r"refused: its pickle asks for os\.makedirs"):
        store.load_newest(net, optimizer)
    assert not (tmp_path / "PWNED").exists()
    _assert_equal(_values(net, optimizer), before)


def test_extra_state_that_needs_code_and_files_the_manifest_does_not_list_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net, optimizer = _trained()
    root = tmp_path / "ckpt"
    store = _store(root)
    entry = store.write(1, net, optimizer, extra={"epoch": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"step": 1, "extra": _RunsCode()}, root / entry.dir / "extra.pt")
    _rewrite_manifest(root, entry.dir, "extra.pt")
    with pytest.raises(CheckpointError, match=r"extra\.pt refused by torch\.load\(weights_only=True\)"):
        store.load_newest(net, optimizer)
    assert not (tmp_path / "PWNED").exists()

    # A metadata file that points DCP at a file outside the manifest's list.
    entry = store.write(2, net, optimizer, extra={"epoch": 2})
    manifest = json.loads((root / "manifest.json").read_text())
    listed = manifest["checkpoints"][-1]
    del listed["files"]["__0_0.distcp"]
    body = {k: v for k, v in manifest.items() if k != "digest"}
    (root / "manifest.json").write_text(json.dumps({**body, "digest": manifest_digest(body)}))
    with pytest.raises(CheckpointError, match=r"points at files the manifest does not vouch for: \['__0_0\.distcp'\]"):
        store.load_newest(net, optimizer)


def test_a_checkpoint_of_another_model_raises_a_mismatch_and_changes_nothing(tmp_path):
    net, optimizer = _trained()
    store = _store(tmp_path)
    store.write(1, net, optimizer)
    other = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    other_optimizer = torch.optim.Adam(other.parameters(), lr=0.01)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(StateMismatchError, match="does not load into the model and optimizer"):
        store.load_newest(other, other_optimizer)
    _assert_equal([p.detach() for p in other.parameters()], before)


def test_a_corrupt_manifest_is_never_overwritten(tmp_path):
    net, optimizer = _trained()
    store = _store(tmp_path)
    store.write(1, net, optimizer)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="manifest .* is unreadable or corrupt"):
        store.write(2, net, optimizer)
    assert (tmp_path / "manifest.json").read_text() == "{"
    with pytest.raises(ValueError, match="keep_last"):
        ShardedCheckpointStore(tmp_path, keep_last=0)
