"""The drop-in functions of the earlier prototype, against plain float64 references."""

import pytest
import torch

from tolaria.aggregation import (
    aggregate_mean,
    aggregate_sum,
    aggregate_weighted,
    combine_flat_grads,
    flat_to_grads,
    grads_to_flat,
    pcgrad,
)

from .reference import ascending_orders, conflicts_reference, pcgrad_reference


def test_grads_to_flat_round_trip_and_none_skipped():
    grads = [torch.randn(2, 3), None, torch.randn(4), torch.randn(1, 1, 2)]
    flat, shapes = grads_to_flat(grads)
    assert flat.shape == (12,) and shapes == [torch.Size([2, 3]), torch.Size([4]), torch.Size([1, 1, 2])]
    back = flat_to_grads(flat, shapes)
    for a, b in zip(back, [g for g in grads if g is not None]):
        assert torch.equal(a, b)


def test_grads_to_flat_empty_input_needs_dtype_and_device():
    with pytest.raises(ValueError, match="dtype= and device="):
        grads_to_flat([])
    flat, shapes = grads_to_flat([None], dtype=torch.bfloat16, device="cpu")
    assert flat.dtype == torch.bfloat16 and flat.numel() == 0 and shapes == []


def test_grads_to_flat_refuses_mixed_dtypes():
    with pytest.raises(ValueError, match="entry 1"):
        grads_to_flat([torch.randn(2), torch.randn(2, dtype=torch.float64)])


def test_flat_to_grads_checks_sizes():
    with pytest.raises(ValueError, match="hold 6 elements but flat has 5"):
        flat_to_grads(torch.randn(5), [torch.Size([2, 3])])


def test_pcgrad_pair_projection():
    gi = torch.tensor([1.0, 0.0], dtype=torch.float64)
    gj = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(pcgrad(gi, gj), gi - (-1.0 / 2.0) * gj)
    torch.testing.assert_close(pcgrad(gi, -gj), gi)  # no conflict: unchanged
    torch.testing.assert_close(pcgrad(gi, torch.zeros(2, dtype=torch.float64)), gi)


def test_mean_sum_weighted_any_rank():
    grads = [torch.randn(2, 3, 4, dtype=torch.float64) for _ in range(3)]
    stacked = torch.stack(grads)
    torch.testing.assert_close(aggregate_mean(grads), stacked.mean(0))
    torch.testing.assert_close(aggregate_sum(grads), stacked.sum(0))
    w = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(aggregate_weighted(grads, w.tolist()), (w.view(3, 1, 1, 1) * stacked).sum(0) / w.sum())


def test_aggregate_weighted_refuses_bad_weights():
    grads = [torch.randn(3), torch.randn(3)]
    with pytest.raises(ValueError, match="1 weights but got 2"):
        aggregate_weighted(grads, [1.0])
    with pytest.raises(ValueError, match="must be positive"):
        aggregate_weighted(grads, [0.0, 0.0])
    with pytest.raises(ValueError, match="K = 0"):
        aggregate_mean([])


def test_combine_flat_grads_projects_every_pair():
    flats = [torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    flats[1] = -flats[0] + 0.1 * flats[1]
    out, conflicts = combine_flat_grads(flats)
    j = torch.stack(flats)
    torch.testing.assert_close(out, pcgrad_reference(j, ascending_orders(5)))
    assert conflicts == conflicts_reference(j, ascending_orders(5)) and conflicts >= 2


def test_combine_flat_grads_weighted_and_plain():
    flats = [torch.randn(10, dtype=torch.float64) for _ in range(3)]
    w = [1.0, 2.0, 3.0]
    out, conflicts = combine_flat_grads(flats, use_pcgrad=False, weights=w)
    torch.testing.assert_close(out, sum(wi * f for wi, f in zip(w, flats)) / 6.0)
    assert conflicts == 0
    out, _ = combine_flat_grads(flats, use_pcgrad=False)
    torch.testing.assert_close(out, sum(flats))
    out, _ = combine_flat_grads(flats, weights=w)
    torch.testing.assert_close(out, pcgrad_reference(torch.stack(flats), ascending_orders(3), "mean", w))
