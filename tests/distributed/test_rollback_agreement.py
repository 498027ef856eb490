"""The rollback agreement and the JSON all-gather in one process (the two-rank behaviour is in
tests/trainer/test_distributed_rollback.py and, through the checkpoints' RNG states,
tests/distributed/test_rank_killed.py)."""

from __future__ import annotations

import pytest
import torch

from tolaria.distributed import (
    DistributedContext,
    RollbackAgreement,
    adopt_main_state,
    agree_on_rollback,
    all_gather_json,
)


def test_rollback_agreement_says_whether_every_rank_restored_the_same_step():
    assert RollbackAgreement((6, 6)).consistent and not RollbackAgreement((6, 6)).any_failed
    assert RollbackAgreement((None, None)).consistent and RollbackAgreement((None, None)).any_failed
    split = RollbackAgreement((6, None))
    assert not split.consistent and split.any_failed
    assert split.describe() == "rank 0 restored step 6, rank 1 restored nothing"
    assert not RollbackAgreement((4, 6)).consistent and not RollbackAgreement((4, 6)).any_failed


def test_one_process_agrees_with_itself():
    ctx = DistributedContext.single_process("cpu")
    assert agree_on_rollback(3, ctx) == RollbackAgreement((3,))
    assert agree_on_rollback(None, ctx) == RollbackAgreement((None,))
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        agree_on_rollback(-1, ctx)
    assert all_gather_json({"a": [1, 2.5, None]}, ctx) == [{"a": [1, 2.5, None]}]
    with pytest.raises(TypeError):
        all_gather_json({"t": torch.zeros(1)}, ctx)  # not JSON-able: raised, not sent
    net = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in net.parameters()]
    extra = {"aggregator": 1}
    assert adopt_main_state(net, torch.optim.SGD(net.parameters(), lr=0.1), ctx, extra=extra) is extra
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
