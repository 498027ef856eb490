"""Each torchrun attempt gets its own store prefix: torchrun keeps its rendezvous store across
restarts, so a restarted group must not read the dead attempt's keys (the end-to-end case is
tests/distributed/test_rank_killed.py)."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from tolaria.distributed.context import _elastic_attempt_store


def test_a_restarted_attempt_reads_and_writes_under_its_own_prefix(monkeypatch):
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    server.set("rank_0_address", "dead attempt")  # what the first attempt left behind
    store = _elastic_attempt_store(1, 10.0)
    assert store is not None
    store.set("rank_0_address", "this attempt")
    assert server.get("tolaria/attempt-1/rank_0_address") == b"this attempt"
    assert server.get("rank_0_address") == b"dead attempt"
    assert not store.check(["other_key"])


def test_no_prefix_outside_torchrun_or_with_a_fresh_store_per_attempt(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert _elastic_attempt_store(2, 10.0) is None  # plain env:// (no torchrun agent store)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    assert _elastic_attempt_store(2, 10.0) is None  # torchrun makes a new store per attempt itself
