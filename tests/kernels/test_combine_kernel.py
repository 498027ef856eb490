"""The combine kernel (out = w^T J) against float64 PyTorch: dtypes, K, layouts, in-place output."""

import pytest
import torch
from kernel_cases import DEVICE, DTYPES, KS, assert_result_close, randn

from tolaria.kernels.combine import combine
from tolaria.kernels.rows import INTERPRETED


def _weights(k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, generator=gen, dtype=torch.float64).to(DEVICE)


def _reference(j, w):
    j64 = torch.stack(list(j)) if not isinstance(j, torch.Tensor) else j
    return w.cpu() @ j64.detach().cpu().to(torch.float64)


def _scale(j, w):
    # The sum of |w_k x_k|: the size of what the float32 accumulator adds, whatever cancels.
    j64 = torch.stack(list(j)) if not isinstance(j, torch.Tensor) else j
    return (w.cpu().abs() @ j64.detach().cpu().to(torch.float64).abs()).max()


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("k", KS)
def test_matches_float64(dtype, k):
    j = randn(k, 157, dtype=dtype, seed=k)
    w = _weights(k, k)
    out = combine(j, w)
    assert out.shape == (157,) and out.dtype == dtype and out.device == j.device
    assert_result_close(out, _reference(j, w), dtype, _scale(j, w))


@pytest.mark.parametrize("n", [1, 15, 16, 17, 47, 48, 49])
def test_any_n(n):
    j = randn(6, n, dtype=torch.bfloat16, seed=n)
    w = _weights(6)
    assert_result_close(combine(j, w, block_n=16), _reference(j, w), torch.bfloat16, _scale(j, w))


def test_writes_into_the_given_buffer():
    j = randn(5, 130, dtype=torch.float16)
    w = _weights(5)
    buf = torch.full((10, 13), float("nan"), dtype=torch.float16, device=DEVICE)
    result = combine(j, w, out=buf)
    assert result.data_ptr() == buf.data_ptr() and result.shape == (130,)
    assert_result_close(buf.view(-1), _reference(j, w), torch.float16, _scale(j, w))


def test_weights_of_any_float_dtype():
    j = randn(3, 40)
    w32 = _weights(3).to(torch.float32)
    assert_result_close(combine(j, w32), _reference(j, w32.double()), torch.float32, _scale(j, w32.double()))


LAYOUTS = {
    "row_stride_gt_n": lambda base: base[:, 3:104],
    "every_other_row": lambda base: base[::2, :101],
    "column_stride_2": lambda base: base[:, :202:2],
    "transposed": lambda base: base[:, :101].t().contiguous().t(),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_matrices(layout):
    j = LAYOUTS[layout](randn(10, 256, dtype=torch.bfloat16, seed=2))
    w = _weights(j.shape[0])
    assert_result_close(combine(j, w, block_n=32), _reference(j, w), torch.bfloat16, _scale(j, w))


def test_separate_tensors():
    rows = [randn(77, seed=s) for s in range(9)]
    w = _weights(9)
    assert_result_close(combine(rows, w), _reference(rows, w), torch.float32, _scale(rows, w))


def test_the_output_may_be_one_of_the_rows():
    # Each program reads its columns of every row before writing them: aliasing a row is safe.
    j = randn(4, 90)
    w = _weights(4)
    expected = _reference(j, w)
    combine(j, w, out=j[2])
    assert_result_close(j[2], expected, torch.float32, _scale(j, w) + 1)


def test_bad_inputs_are_named():
    j = randn(3, 20)
    with pytest.raises(ValueError, match="3 weights"):
        combine(j, _weights(4))
    with pytest.raises(ValueError, match="out is"):
        combine(j, _weights(3), out=torch.empty(21, device=DEVICE))
    with pytest.raises(ValueError, match="out is"):
        combine(j, _weights(3), out=torch.empty(20, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        combine(j, _weights(3), out=torch.empty(40, device=DEVICE)[::2])
    with pytest.raises(TypeError, match="floating point"):
        combine(j, torch.ones(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="weights are on"):
        combine(j, torch.ones(3, device="meta"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_accumulates_in_float64_and_rounds_once(dtype):
    # Cancelling weights: float32 accumulation would be off by its rounding times the cancellation.
    j = randn(5, 300, dtype=dtype, seed=11)
    w = torch.tensor([1e4, -1e4, 2.0, -1.5, 0.25], dtype=torch.float64, device=j.device)
    exact = w @ j.to(torch.float64)
    out = combine(j, w, wide=True)
    half_ulp = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    if INTERPRETED and dtype == torch.bfloat16:
        half_ulp *= 2  # Triton's interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest)
    subnormal = 2.0**-24 if dtype == torch.float16 else 0.0
    bound = 1.01 * half_ulp * exact.abs() + subnormal + 1e-12 * (w.abs() @ j.to(torch.float64).abs())
    assert ((out.to(torch.float64) - exact).abs() <= bound).all()
