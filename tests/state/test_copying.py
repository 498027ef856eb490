"""copy_tensors: the chunked, multi-threaded copy behind snapshots and restores matches copy_."""

from __future__ import annotations

import pytest
import torch

from tolaria.state import copying
from tolaria.state.copying import copy_tensors


def _pairs():
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(3_000_000, generator=gen)  # above the inline size: chunked across threads
    return [
        (torch.empty(3_000_000), big),
        (torch.empty(1000, 700, dtype=torch.float64), torch.randn(1000, 700, generator=gen)),  # with a cast
        (torch.empty(700, 1000).t(), torch.randn(1000, 700, generator=gen)),  # non-contiguous destination
        (torch.empty(5, dtype=torch.bfloat16), torch.randn(5, generator=gen)),  # small: inline
        (torch.empty(0, 4), torch.empty(0, 4)),
    ]


@pytest.mark.parametrize("threads", [1, 2])
def test_copies_match_copy_(monkeypatch, threads):
    monkeypatch.setattr(copying.torch, "get_num_threads", lambda: threads)
    pairs = _pairs()
    copy_tensors(pairs)
    for dst, src in pairs:
        assert torch.equal(dst, src.to(dst.dtype))


def test_destination_may_require_grad_and_version_counter_moves():
    param = torch.nn.Parameter(torch.zeros(600_000))
    before = param._version
    copy_tensors([(param, torch.ones(600_000))])
    assert torch.equal(param.detach(), torch.ones(600_000)) and param.requires_grad
    assert param._version > before  # autograd sees the in-place change


def test_a_failing_copy_raises():
    with pytest.raises(RuntimeError):
        copy_tensors([(torch.empty(2_000_000), torch.empty(3, 5))])


def test_after_fork_reset_makes_a_fresh_pool():
    copy_tensors(_pairs())
    old = copying._pool
    copying._forget_pool_after_fork()  # what a forked child runs: the parent's threads do not exist there
    pairs = _pairs()
    copy_tensors(pairs)
    assert all(torch.equal(d, s.to(d.dtype)) for d, s in pairs)
    assert copying._pool is not old
