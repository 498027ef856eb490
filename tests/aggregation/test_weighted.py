"""Weighted, Mean and Sum against float64 references."""

import pytest
import torch

from tolaria.aggregation import Mean, Sum, Weighted

from .reference import assert_close_to_reference

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(1, 3), (2, 1000), (7, 4099), (17, 65)])
def test_fixed_weight_aggregators(backend, dtype, k, n):
    j = torch.randn((k, n), dtype=torch.float64, generator=torch.Generator().manual_seed(k + n)).to(dtype)
    ref = j.to(torch.float64)
    w = torch.linspace(0.1, 2.0, k, dtype=torch.float64)
    assert_close_to_reference(Sum(backend=backend)(j), ref.sum(0), dtype)
    assert_close_to_reference(Mean(backend=backend)(j), ref.mean(0), dtype)
    assert_close_to_reference(Weighted(w, backend=backend)(j), (w[:, None] * ref).sum(0), dtype)


def test_weighted_validates_its_weights():
    with pytest.raises(ValueError, match="must not be negative"):
        Weighted([1.0, -3.0])
    with pytest.raises(ValueError, match="not finite"):
        Weighted([1.0, float("nan")])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        Weighted([])
    with pytest.raises(TypeError, match="weight 1 is a str"):
        Weighted([1.0, "2"])
    with pytest.raises(ValueError, match="2 weights but got 3"):
        Weighted([1.0, 1.0])(torch.randn(3, 5))


def test_stats_have_no_conflicts_for_plain_sums():
    _, stats = Sum()(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), return_stats=True)
    assert int(stats.conflicts) == 0
    torch.testing.assert_close(stats.cosine, torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_offset", [0, 1])
def test_large_inputs_on_every_thread_with_streamed_output(dtype, out_offset):
    # Past 8 MiB of fp32 output the compiled combine streams its stores past the caches (only on a
    # cache-line-aligned output: offset 1 takes the plain stores); N is not a multiple of any block,
    # so the ragged tail of the last thread's range is covered too.
    k, n = 3, (9 << 20) // 4 + 37
    j = torch.randn((k, n), generator=torch.Generator().manual_seed(3)).to(dtype)
    w = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
    out = torch.full((n + out_offset,), float("nan"), dtype=dtype)[out_offset:]
    result = Weighted(w.abs(), backend="cpu")(j, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close_to_reference(result, (w.abs()[:, None] * j.to(torch.float64)).sum(0), dtype)
    assert_close_to_reference(Sum(backend="cpu")(list(j.unbind(0))), j.to(torch.float64).sum(0), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_outputs_round_exactly_like_torch(dtype):
    # The compiled pass converts whole vectors (bf16 by bit shifts, fp16 by the hardware
    # conversion) and sums in float32, as torch's own (a.float() + b.float()).to(dtype) does: the
    # results must agree bit for bit, ties, subnormals, -0, inf and NaN included.
    gen = torch.Generator().manual_seed(11)
    n = 70_001  # whole vectors and a ragged tail
    a = (torch.randn(n, generator=gen) * torch.logspace(-6, 4, n)).to(dtype)
    b = (torch.randn(n, generator=gen) * torch.logspace(4, -6, n)).to(dtype)
    info = torch.finfo(dtype)
    specials = torch.tensor([1.0, 1.0, info.max, info.tiny, info.tiny / 4, float("inf"), float("nan"), -0.0, 3.0])
    partners = torch.tensor(
        [
            2.0**-8 if dtype == torch.bfloat16 else 2.0**-11,
            3 * 2.0**-9,
            info.max,
            -info.tiny / 2,
            info.tiny / 8,
            1.0,
            2.0,
            -0.0,
            -1.0,
        ]
    )
    a[: len(specials)], b[: len(partners)] = specials.to(dtype), partners.to(dtype)
    out = Sum(backend="cpu", nonfinite="propagate")(torch.stack([a, b]))
    expected = (a.float() + b.float()).to(dtype)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan) and nan.any()  # NaN where torch has NaN (its payload may differ)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))  # every other bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negative_zero_sums_to_negative_zero(dtype):
    j = torch.tensor([[-0.0, -0.0, 1.0], [-0.0, 0.0, -1.0]], dtype=dtype)
    out = Sum(backend="cpu")(j)
    assert torch.equal(out.signbit(), torch.tensor([True, False, False]))


@pytest.mark.parametrize("make", [lambda: Sum(), lambda: Mean(), lambda: Weighted([1.0, 2.0, 0.0])])
def test_fixed_weights_read_j_once_unless_stats_or_trouble(make, monkeypatch):
    # Sums, means and fixed weights need no Gram matrix: without stats only the combine pass runs;
    # the Gram pass runs for stats, and to name the sources when the result is not finite.
    from tolaria.aggregation import engine

    calls = []
    real_gram = engine._cpu_backend.gram
    monkeypatch.setattr(engine._cpu_backend, "gram", lambda sources: calls.append(1) or real_gram(sources))
    j = torch.randn(3, 1000, dtype=torch.float64)
    agg = make()
    agg(j)
    assert calls == []
    agg(j, return_stats=True)
    assert calls == [1]
    bad = j.clone()
    bad[2, 7] = float("inf")  # weight 0 in Weighted: 0 * inf is NaN, still caught and named
    with pytest.raises(ValueError, match=r"source\(s\) 2"):
        agg(bad)
    assert calls == [1, 1]


def test_finite_inputs_that_overflow_are_returned_not_rejected():
    big = torch.full((2, 100), 3e38, dtype=torch.float32)
    out = Sum()(big)  # every input finite: the sum overflows to inf, which is the honest result
    assert torch.isinf(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "where", [5, 1 << 20, (1 << 21) + 30]
)  # first vectors, the second thread's range, the ragged tail
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_combine_pass_reports_non_finite_sums_wherever_they_are(dtype, where, value):
    from tolaria.aggregation import as_sources
    from tolaria.aggregation.backends import CompiledCpuBackend

    n = (1 << 21) + 37
    j = torch.ones((2, n), dtype=dtype)
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    backend = CompiledCpuBackend()
    _, finite = backend.combine_checked(as_sources(j), w, None)
    assert finite
    j[1, where] = value
    _, finite = backend.combine_checked(as_sources(j), w, None)
    assert not finite
    with pytest.raises(ValueError, match=r"source\(s\) 1"):
        Weighted(w)(j)


def test_constant_is_torchjds_name_for_weighted():
    from tolaria.aggregation import Constant

    j = torch.randn(3, 20, dtype=torch.float64)
    w = [0.5, 2.0, -1.0]
    torch.testing.assert_close(Constant(w)(j), Weighted(w)(j))
    assert repr(Constant(w)).startswith("Constant(weights=[0.5, 2.0, -1.0]")
