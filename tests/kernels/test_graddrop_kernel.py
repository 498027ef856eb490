"""The GradDrop kernel against a float64 reference written from the paper (Chen et al. 2020,
Algorithm 1 lines 10-15), with the same uniforms; and bit for bit against the other backends."""

import pytest
import torch
from kernel_cases import DEVICE, DTYPES, KS, assert_result_close, randn

from tolaria.aggregation.backends.coordinatewise import graddrop_uniforms
from tolaria.kernels.graddrop import graddrop

KEYS = (12345, 2**31 - 7)


def paper_reference(j: torch.Tensor, u: torch.Tensor, leak=None) -> torch.Tensor:
    """P = (1 + sum g / sum |g|) / 2; M_i = [P > U][g_i > 0] + [P < U][g_i < 0]; sum_i (l_i + (1 - l_i) M_i) g_i."""
    g = j.detach().cpu().to(torch.float64)
    u = u.cpu().to(torch.float64)
    p = 0.5 * (1 + g.sum(0) / g.abs().sum(0))
    lk = torch.zeros(g.shape[0], dtype=torch.float64) if leak is None else leak.cpu().to(torch.float64)
    out = torch.zeros(g.shape[1], dtype=torch.float64)
    for i in range(g.shape[0]):
        m = ((p > u) & (g[i] > 0)) | ((p < u) & (g[i] < 0))
        out += (lk[i] + (1 - lk[i]) * m.to(torch.float64)) * g[i]
    return out


def _scale(j):
    return j.detach().cpu().to(torch.float64).abs().sum(0).max()


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("k", KS)
def test_matches_the_paper(dtype, k):
    j = randn(k, 157, dtype=dtype, seed=k)
    out, flag = graddrop(j, KEYS)
    assert out.shape == (157,) and out.dtype == dtype and out.device == j.device and flag is None
    assert_result_close(out, paper_reference(j, graddrop_uniforms(KEYS, 0, 157)), dtype, _scale(j))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_leak(dtype):
    j = randn(4, 200, dtype=dtype, seed=3)
    leak = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64, device=DEVICE)
    out, _ = graddrop(j, KEYS, leak=leak)
    assert_result_close(out, paper_reference(j, graddrop_uniforms(KEYS, 0, 200), leak), dtype, _scale(j))


def test_full_leak_is_the_sum():
    j = randn(3, 100, dtype=torch.float64)
    out, _ = graddrop(j, KEYS, leak=torch.ones(3, dtype=torch.float64, device=DEVICE))
    torch.testing.assert_close(out, j.sum(0))


def test_each_coordinate_keeps_one_sign_and_zero_columns_give_zero():
    j = randn(6, 300, dtype=torch.float64, seed=5)
    j[:, 7] = 0
    out, _ = graddrop(j, KEYS)
    g = j.cpu()
    pos, neg = g.clamp_min(0).sum(0), g.clamp_max(0).sum(0)
    o = out.cpu()
    assert torch.all((o == pos) | (o == neg) | (o == 0)) and o[7] == 0


@pytest.mark.parametrize("n", [1, 15, 16, 17, 63, 64, 65])
def test_any_n(n):
    j = randn(5, n, dtype=torch.float32, seed=n)
    out, _ = graddrop(j, KEYS, block_n=16)
    assert_result_close(out, paper_reference(j, graddrop_uniforms(KEYS, 0, n)), torch.float32, _scale(j))


def test_layouts_give_the_same_bits():
    base = randn(5, 300, dtype=torch.float32, seed=1)
    strided = base[:, 10:210]
    rows = [r.clone() for r in strided]
    expected, _ = graddrop(strided.contiguous(), KEYS)
    assert torch.equal(graddrop(strided, KEYS)[0], expected)
    assert torch.equal(graddrop(rows, KEYS)[0], expected)
    assert torch.equal(graddrop(strided.T.contiguous().T, KEYS)[0], expected)  # column stride K


def test_same_bits_as_the_compiled_and_torch_backends():
    if DEVICE.type != "cpu":
        pytest.skip("compares with the CPU backends on CPU tensors")
    from tolaria.aggregation import as_sources
    from tolaria.aggregation.backends.coordinatewise import graddrop as run
    from tolaria.aggregation.engine import select_backend

    for dtype in (torch.float32, torch.float16, torch.float64):
        j = randn(7, 333, dtype=dtype, seed=2)
        out, _ = graddrop(j, KEYS)
        for backend in (select_backend("cpu", as_sources(j)), select_backend("torch", as_sources(j))):
            assert torch.equal(run(backend, as_sources(j), KEYS)[0], out), (backend.name, dtype)


def test_out_and_nonfinite_flag():
    j = randn(3, 130, dtype=torch.float16)
    buf = torch.full((10, 13), float("nan"), dtype=torch.float16, device=DEVICE)
    result, flag = graddrop(j, KEYS, out=buf, check=True)
    assert result.data_ptr() == buf.data_ptr() and int(flag.item()) == 0
    j[1, 5] = float("inf")
    assert int(graddrop(j, KEYS, check=True)[1].item()) == 1


def test_bad_arguments_are_refused():
    j = randn(3, 20)
    with pytest.raises(ValueError, match="keys"):
        graddrop(j, (1, 2**31))
    with pytest.raises(ValueError, match="leak"):
        graddrop(j, KEYS, leak=torch.zeros(2, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        graddrop(j, KEYS, out=torch.empty(19, device=DEVICE))
    with pytest.raises(ValueError, match="block_n"):
        graddrop(j, KEYS, block_n=24)
