"""Input forms, output shape/dtype/device, and the errors bad input gets."""

import pytest
import torch

from tolaria.aggregation import Mean, PCGrad, Sum, Weighted

AGGREGATORS = [
    lambda **kw: PCGrad(**kw),
    lambda **kw: Mean(**kw),
    lambda **kw: Sum(**kw),
    lambda **kw: Weighted([1.0, 2.0, 0.5], **kw),
]


@pytest.mark.parametrize("make", AGGREGATORS)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_three_input_forms_agree(make, backend):
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn((3, 4, 5, 6), generator=gen)
    agg = make(backend=backend, nonfinite="raise")
    if isinstance(agg, PCGrad):
        agg.shuffle = False
    from_tensor = agg(grads)
    from_matrix = agg(grads.reshape(3, -1))
    from_list = agg(list(grads))
    assert from_tensor.shape == (4, 5, 6)
    assert from_matrix.shape == (120,)
    torch.testing.assert_close(from_tensor.reshape(-1), from_matrix)
    torch.testing.assert_close(from_list, from_tensor)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtype_and_device_preserved(dtype):
    out = PCGrad()(torch.randn(3, 10).to(dtype))
    assert out.dtype == dtype and out.device.type == "cpu"


def test_strided_and_non_contiguous_rows():
    big = torch.randn(6, 50, dtype=torch.float64)
    strided = big[::2, 5:45]  # rows with a stride of 100 elements, each row contiguous
    transposed = torch.randn(40, 3, dtype=torch.float64).T  # rows not contiguous at all
    for j in (strided, transposed):
        ref = Sum(backend="torch")(j.contiguous())
        torch.testing.assert_close(Sum(backend="cpu")(j), ref)
        torch.testing.assert_close(
            PCGrad(backend="cpu", shuffle=False)(j), PCGrad(backend="torch", shuffle=False)(j.contiguous())
        )


def test_k1_returns_the_gradient_unchanged():
    g = torch.randn(1, 7, 3)
    for agg in (PCGrad(), PCGrad(reduction="mean"), Mean(), Sum()):
        assert torch.equal(agg(g), g[0])
        assert torch.equal(agg([g[0]]), g[0])


def test_out_receives_the_result_in_place():
    j = torch.randn(4, 33)
    out = torch.empty(33)
    result = Sum()(j, out=out)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, j.sum(0))
    with pytest.raises(ValueError, match="elements"):
        Sum()(j, out=torch.empty(32))
    with pytest.raises(ValueError, match="float64"):
        Sum()(j, out=torch.empty(33, dtype=torch.float64))


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ([], ValueError, "K = 0"),
        (torch.empty(0, 5), ValueError, "K = 0"),
        (torch.empty(3, 0), ValueError, "empty"),
        ([torch.empty(0), torch.empty(0)], ValueError, "empty"),
        (torch.tensor(1.0), ValueError, "0-d"),
        ([torch.randn(3), torch.randn(4)], ValueError, "source 1 has shape"),
        ([torch.randn(3), torch.randn(3), torch.randn(3, 1)], ValueError, "source 2 has shape"),
        ([torch.randn(3), torch.randn(3, dtype=torch.float64)], ValueError, "source 1 has dtype"),
        ([torch.randn(3), torch.randn(3, device="meta")], ValueError, "source 1 is on meta"),
        ([torch.randn(3), [1.0, 2.0, 3.0]], TypeError, "source 1 is a list"),
        (torch.ones(2, 3, dtype=torch.int64), TypeError, "dtype torch.int64"),
        ("grads", TypeError, "got str"),
        (42, TypeError, "got int"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(bad, error, message):
    with pytest.raises(error, match=message):
        PCGrad()(bad)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_values_name_their_source(backend, dtype, value):
    j = torch.randn(5, 100).to(dtype)
    j[3, 17] = value
    j[1, 99] = value
    with pytest.raises(ValueError, match=r"source\(s\) 1, 3"):
        PCGrad(backend=backend)(j)
    out = PCGrad(backend=backend, nonfinite="propagate")(j)  # no check: non-finite flows through
    assert not torch.isfinite(out).all()


def test_large_finite_fp32_values_are_not_mistaken_for_overflow():
    j = torch.full((2, 1000), 3e30)  # squares overflow fp32 but not the float64 accumulator
    torch.testing.assert_close(Sum(backend="cpu")(j), j.sum(0))
