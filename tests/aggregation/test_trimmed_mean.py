"""TrimmedMean (Yin et al. 2018): every backend and dtype against a float64 reference from the paper,
TorchJD, out=, stats, nonfinite, arguments."""

import pytest
import torch

from tolaria.aggregation.trimmed_mean import TrimmedMean

BACKENDS = ("cpu", "torch", "triton")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def paper_reference(j, trim):
    """Per coordinate: sort the K values, drop trim at each end, average the rest (float64)."""
    g = j.to(torch.float64).reshape(j.shape[0], -1)
    out = torch.tensor(
        [sum(sorted(col)[trim : len(col) - trim]) / (len(col) - 2 * trim) for col in g.T.tolist()], dtype=torch.float64
    )
    return out.reshape(j.shape[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,trim", [(1, 0), (3, 1), (8, 2), (9, 4)])
def test_every_backend_and_dtype_matches_the_paper(backend, dtype, k, trim):
    j = torch.randn(k, 20, 3).to(dtype)
    out = TrimmedMean(trim, backend=backend)(j)
    assert out.shape == (20, 3) and out.dtype == dtype
    assert (out.double() - paper_reference(j, trim)).abs().max() <= RTOL[dtype] * j.double().abs().max()


def test_backends_agree_bit_for_bit():
    j = torch.randn(11, 1000)  # 32 Triton programs under the interpreter (BLOCK_N 32), the last one masked
    results = [TrimmedMean(3, backend=b)(j) for b in BACKENDS + ("auto",)]
    assert all(torch.equal(r, results[0]) for r in results)


def test_inputs_as_matrix_list_and_shaped_tensor_agree():
    j = torch.randn(5, 6, 5, dtype=torch.float64)
    a = TrimmedMean(1)(j)
    assert torch.equal(TrimmedMean(1)(list(j)), a)
    assert torch.equal(TrimmedMean(1)(j.reshape(5, 30)), a.reshape(30))


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_agrees_with_torchjd(dtype):
    tjd = pytest.importorskip("torchjd.aggregation")
    j = torch.randn(9, 500, dtype=dtype)
    for trim in (0, 1, 4):
        torch.testing.assert_close(TrimmedMean(trim)(j), tjd.TrimmedMean(trim)(j))


def test_outliers_are_trimmed():
    j = torch.randn(7, 100, dtype=torch.float64)
    j[0] = 1e30
    j[6] = -1e30
    assert TrimmedMean(1)(j).abs().max() < 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_and_stats(backend):
    j = torch.randn(5, 40, dtype=torch.float16)
    buf = torch.empty(8, 5, dtype=torch.float16)
    result, stats = TrimmedMean(1, backend=backend)(j, out=buf, return_stats=True)
    assert result is buf and torch.equal(buf.view(-1), TrimmedMean(1, backend=backend)(j))
    assert torch.isnan(stats.weights).all() and int(stats.conflicts) == 0
    torch.testing.assert_close(stats.gram, j.double() @ j.double().T, rtol=1e-5, atol=1e-5)  # Triton: float32 sums


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_raise_names_the_sources_and_propagate_trims_them(backend):
    j = torch.randn(5, 30)
    j[2, 3] = float("nan")
    j[4, 7] = float("inf")
    with pytest.raises(ValueError, match=r"source\(s\) 2, 4"):
        TrimmedMean(1, backend=backend)(j)
    out = TrimmedMean(1, backend=backend, nonfinite="propagate")(j)
    assert torch.isfinite(out).all()  # NaN ranks above +inf: both trimmed as the largest
    assert torch.isnan(TrimmedMean(0, backend=backend, nonfinite="propagate")(j)[3])


def test_bad_arguments_are_refused():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="trim_number"):
            TrimmedMean(bad)
    with pytest.raises(ValueError, match=r"trim_number=2\) drops 4 values .* at least 5 gradient sources, got 4"):
        TrimmedMean(2)(torch.randn(4, 10))
    with pytest.raises(ValueError, match="backend"):
        TrimmedMean(1, backend="gpu")
    with pytest.raises(TypeError, match="not a function of the Gram matrix"):
        TrimmedMean(1).weighting(torch.eye(3))


def test_every_cpu_isa_level_gives_the_torch_backends_bits():
    from tolaria.aggregation import cpu_isa, set_cpu_isa, supported_cpu_isas

    j = torch.randn(13, 1037)
    before = cpu_isa()
    try:
        for level in supported_cpu_isas():
            set_cpu_isa(level)
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                x = j.to(dtype)
                assert torch.equal(TrimmedMean(4, backend="cpu")(x), TrimmedMean(4, backend="torch")(x)), (level, dtype)
    finally:
        set_cpu_isa(before)
