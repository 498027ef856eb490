"""The TrimmedMean kernel against a float64 reference written from the paper (Yin et al. 2018: per
coordinate, drop the b largest and b smallest values, average the rest); and bit for bit against the
other backends."""

import pytest
import torch
from kernel_cases import DEVICE, DTYPES, KS, assert_result_close, randn

from tolaria.kernels.trimmed_mean import trimmed_mean


def paper_reference(j: torch.Tensor, trim: int) -> torch.Tensor:
    g = j.detach().cpu().to(torch.float64)
    k, n = g.shape
    out = torch.empty(n, dtype=torch.float64)
    for c in range(n):
        values = sorted(g[:, c].tolist())
        kept = values[trim : k - trim]
        out[c] = sum(kept) / len(kept)
    return out


def _trims(k):
    # Under the interpreter, K = 64 runs its widest trim only (each trim is another kernel build there).
    if k > 32 and DEVICE.type == "cpu":
        return [(k - 1) // 2]
    return sorted({0, (k - 1) // 2, min(1, (k - 1) // 2)})


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("k", KS)
def test_matches_the_paper(dtype, k):
    j = randn(k, 67, dtype=dtype, seed=k)
    for trim in _trims(k):
        out, flag = trimmed_mean(j, trim)
        assert out.shape == (67,) and out.dtype == dtype and out.device == j.device and flag is None
        assert_result_close(out, paper_reference(j, trim), dtype, j.detach().cpu().double().abs().max())


def test_ties_infinities_and_nan_rank_as_torch_sort():
    j = torch.tensor(
        [
            [1.0, float("inf"), float("nan"), 0.0, -0.0],
            [1.0, 2.0, 1.0, -0.0, 0.0],
            [1.0, float("-inf"), 2.0, 0.0, 0.0],
            [5.0, 3.0, 3.0, 0.0, -0.0],
            [1.0, 4.0, float("nan"), 0.0, 0.0],
        ],
        device=DEVICE,
    )
    out, flag = trimmed_mean(j, 1, check=True)
    assert int(flag.item()) == 1
    expected = torch.tensor([1.0, 3.0, float("nan"), 0.0, 0.0])
    torch.testing.assert_close(out.cpu(), expected, equal_nan=True)
    out2, _ = trimmed_mean(j, 2)
    torch.testing.assert_close(out2.cpu(), torch.tensor([1.0, 3.0, 3.0, 0.0, 0.0]))


@pytest.mark.parametrize("n", [1, 15, 16, 17, 33])
def test_any_n(n):
    j = randn(6, n, dtype=torch.bfloat16, seed=n)
    assert_result_close(
        trimmed_mean(j, 2, block_n=16)[0], paper_reference(j, 2), torch.bfloat16, j.cpu().double().abs().max()
    )


def test_layouts_give_the_same_bits():
    base = randn(5, 300, seed=1)
    strided = base[:, 10:210]
    expected, _ = trimmed_mean(strided.contiguous(), 1)
    assert torch.equal(trimmed_mean(strided, 1)[0], expected)
    assert torch.equal(trimmed_mean([r.clone() for r in strided], 1)[0], expected)
    assert torch.equal(trimmed_mean(strided.T.contiguous().T, 1)[0], expected)


def test_same_bits_as_the_compiled_and_torch_backends():
    if DEVICE.type != "cpu":
        pytest.skip("compares with the CPU backends on CPU tensors")
    from tolaria.aggregation import as_sources
    from tolaria.aggregation.backends.coordinatewise import trimmed_mean as run
    from tolaria.aggregation.engine import select_backend

    for dtype in (torch.float32, torch.float16, torch.float64):
        for k, trim in ((3, 1), (8, 2), (17, 5)):
            j = randn(k, 333, dtype=dtype, seed=k)
            out, _ = trimmed_mean(j, trim)
            for backend in (select_backend("cpu", as_sources(j)), select_backend("torch", as_sources(j))):
                assert torch.equal(run(backend, as_sources(j), trim)[0], out), (backend.name, dtype, k)


def test_out():
    j = randn(5, 130, dtype=torch.float16)
    buf = torch.full((10, 13), float("nan"), dtype=torch.float16, device=DEVICE)
    result, _ = trimmed_mean(j, 1, out=buf)
    assert result.data_ptr() == buf.data_ptr()
    assert_result_close(buf.view(-1), paper_reference(j, 1), torch.float16, j.cpu().double().abs().max())


def test_bad_arguments_are_refused():
    j = randn(4, 20)
    with pytest.raises(ValueError, match="more than 4 rows"):
        trimmed_mean(j, 2)
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(j, -1)
    with pytest.raises(ValueError, match="block_n"):
        trimmed_mean(j, 1, block_n=48)
