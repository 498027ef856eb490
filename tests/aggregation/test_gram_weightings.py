"""Properties every Gram-space conflict-aware aggregator shares (MGDA, UPGrad, CAGrad, IMTLG, AlignedMTL,
DualProj): both backends, every dtype, stats, the finiteness modes, degenerate inputs, name lookup."""

import pytest
import torch

import tolaria.aggregation._canonical as canonical_module
from tolaria.aggregation import (
    AGGREGATOR_NAMES,
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    DualProj,
    Mean,
    PCGrad,
    UPGrad,
    Weighted,
    as_sources,
    build_aggregator,
    jacobi_eig,
    symmetric_eig,
)
from tolaria.aggregation.engine import aggregate

from .conflict_cases import cases, make_jacobian

FACTORIES = {
    "mgda": MGDA,
    "upgrad": UPGrad,
    "cagrad": CAGrad,
    "imtlg": IMTLG,
    "aligned_mtl": AlignedMTL,
    "dualproj": DualProj,
}
DTYPE_TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 5e-2}


def _reference_result(name: str, j: torch.Tensor) -> torch.Tensor:
    """The same aggregator's result on the float64 matrix: what every dtype and backend must match."""
    return FACTORIES[name](backend="torch")(j.to(torch.float64))


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backends_and_dtypes_match_float64(name, backend, dtype):
    j = make_jacobian("conflicting", 4, 3000, seed=1).to(dtype)
    out = FACTORIES[name](backend=backend)(j)
    assert out.dtype == dtype and out.shape == (3000,)
    ref = _reference_result(name, j)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < DTYPE_TOL[dtype], err


@pytest.mark.parametrize("name", FACTORIES)
def test_stats_report_the_weights_applied(name):
    j = make_jacobian("conflicting", 5, 200, seed=2)
    out, stats = FACTORIES[name]()(j, return_stats=True)
    torch.testing.assert_close(out, stats.weights @ j, rtol=1e-10, atol=1e-10)
    assert stats.conflicts.dtype == torch.int64 and stats.conflicts.dim() == 0
    torch.testing.assert_close(stats.gram, j @ j.T)


@pytest.mark.parametrize("name", ["mgda", "upgrad", "cagrad", "imtlg", "aligned_mtl"])
def test_conflicts_count_conflicting_pairs(name):
    j = make_jacobian("random", 6, 50, seed=3)
    g = j @ j.T
    expected = int(sum(1 for a in range(6) for b in range(a + 1, 6) if g[a, b] < 0))
    _, stats = FACTORIES[name]()(j, return_stats=True)
    assert int(stats.conflicts) == expected


def test_dualproj_conflicts_count_violated_constraints():
    j = make_jacobian("conflicting", 5, 40, seed=4)
    expected = int(((j @ j.mean(0)) < 0).sum())
    _, stats = DualProj()(j, return_stats=True)
    assert int(stats.conflicts) == expected


@pytest.mark.parametrize("name", FACTORIES)
def test_nonfinite_raise_names_the_source(name):
    j = make_jacobian("random", 3, 20)
    j[1, 4] = float("nan")
    with pytest.raises(ValueError, match="source\\(s\\) 1"):
        FACTORIES[name]()(j)


@pytest.mark.parametrize("name", FACTORIES)
def test_nonfinite_propagate_gives_nan_not_an_exception(name):
    j = make_jacobian("random", 3, 20)
    j[2, 0] = float("inf")
    out = FACTORIES[name](nonfinite="propagate")(j)
    assert torch.isnan(out).any()


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("kind,k,n", cases(ks=(1, 2, 5), n=30) + [("random", 6, 3), ("zero_row", 4, 2)])
def test_degenerate_inputs_give_finite_results(name, kind, k, n):
    j = make_jacobian(kind, k, n, seed=5)
    out, stats = FACTORIES[name]()(j, return_stats=True)
    assert torch.isfinite(out).all() and torch.isfinite(stats.weights).all()


@pytest.mark.parametrize("name", FACTORIES)
def test_all_zero_gradients_give_zero(name):
    out = FACTORIES[name]()(torch.zeros(4, 10, dtype=torch.float64))
    assert torch.equal(out, torch.zeros(10, dtype=torch.float64))


@pytest.mark.parametrize("name", ["mgda", "upgrad", "imtlg", "aligned_mtl", "dualproj"])
def test_single_source_is_returned_unchanged(name):
    j = make_jacobian("random", 1, 25)
    torch.testing.assert_close(FACTORIES[name]()(j), j[0], rtol=1e-12, atol=1e-12)


def test_cagrad_single_source_is_scaled_by_one_plus_c():
    j = make_jacobian("random", 1, 25)
    torch.testing.assert_close(CAGrad(c=0.3)(j), 1.3 * j[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FACTORIES)
def test_weighting_does_not_depend_on_the_scale_of_the_gradients(name):
    j = make_jacobian("conflicting", 4, 40, seed=6)
    agg = FACTORIES[name]()
    torch.testing.assert_close(agg(1e-6 * j), 1e-6 * agg(j), rtol=1e-7, atol=0)


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "aligned_mtl"])
def test_pref_vector_count_is_checked(name):
    with pytest.raises(ValueError, match="3 weights but got 4"):
        FACTORIES[name](pref_vector=[1.0, 1.0, 1.0])(torch.randn(4, 5))


@pytest.mark.parametrize(
    "build",
    [
        lambda: MGDA(max_iters=0),
        lambda: MGDA(epsilon=0),
        lambda: UPGrad(max_iters=-1),
        lambda: DualProj(tol=2.0),
        lambda: CAGrad(c=-1),
        lambda: CAGrad(norm_eps=float("nan")),
        lambda: CAGrad(newton_steps=0),
        lambda: IMTLG(rtol=1.5),
        lambda: AlignedMTL(scale_mode="max"),
        lambda: UPGrad(pref_vector=[1.0, float("inf")]),
    ],
)
def test_bad_configuration_is_refused(build):
    with pytest.raises(ValueError):
        build()


def test_build_aggregator_knows_every_name():
    assert set(AGGREGATOR_NAMES) == {
        "pcgrad",
        "mean",
        "sum",
        "weighted",
        "mgda",
        "upgrad",
        "cagrad",
        "imtlg",
        "aligned_mtl",
        "dualproj",
        "config",
        "constant",
        "krum",
        "random",
        "fairgrad",
        "gradvac",
        "pcd",
        "cr_mogm",
        "modo",
        "sdmgrad",
        "nash_mtl",
        "excess_mtl",
        "graddrop",
        "trimmed_mean",
    }
    for name in AGGREGATOR_NAMES:
        fixed = name in ("weighted", "constant")
        agg = build_aggregator(name, weights=[1.0, 2.0, 0.5]) if fixed else build_aggregator(name)
        assert agg(torch.randn(3, 7)).shape == (7,)
    assert isinstance(build_aggregator("PCGrad", shuffle=False), PCGrad)
    assert isinstance(build_aggregator(" Mean "), Mean)
    assert isinstance(build_aggregator("weighted", weights=[1.0]), Weighted)
    assert build_aggregator("cagrad", c=0.2).c == 0.2


def test_build_aggregator_lists_valid_names_for_an_unknown_one():
    with pytest.raises(ValueError, match="unknown aggregator 'nash'.*pcgrad.*dualproj"):
        build_aggregator("nash")


@pytest.mark.parametrize("kind,k,n", cases(ks=(1, 2, 3, 8, 13), kinds=("random", "duplicate", "low_rank", "zero_row")))
def test_jacobi_eigendecomposition_matches_lapack(kind, k, n):
    j = make_jacobian(kind, k, 2 * k + 3, seed=7 + n)
    g = j @ j.T
    values, vectors = jacobi_eig(g)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(g), rtol=0, atol=1e-12 * g.abs().max())
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, g, rtol=0, atol=1e-12 * g.abs().max())
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)


def test_eig_method_is_checked():
    with pytest.raises(ValueError, match="unknown eigendecomposition method"):
        symmetric_eig(torch.eye(2), method="qr")


@pytest.mark.parametrize("cls", [IMTLG, AlignedMTL])
def test_jacobi_path_gives_the_lapack_answer(cls):
    # The path every non-CPU device takes, checked here on the CPU.
    j = make_jacobian("conflicting", 6, 40, seed=8)
    lapack, jacobi = cls(), cls()
    jacobi.eig_method = "jacobi"
    torch.testing.assert_close(jacobi(j), lapack(j), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("k", [4, 12])
def test_runs_on_meta_tensors(name, k):
    # Meta tensors have no data: any host read (.item(), bool(), .tolist()) would fail. K = 12 takes
    # the interior-point paths, K = 4 the enumeration.
    agg = FACTORIES[name](backend="torch", nonfinite="propagate")
    out, stats = agg(torch.empty(k, 100, device="meta"), return_stats=True)
    assert out.device.type == "meta" and stats.weights.device.type == "meta"


@pytest.mark.parametrize("name", FACTORIES)
def test_compiles_to_one_graph(name):
    # fullgraph=True fails on any data-dependent Python control flow.
    agg = FACTORIES[name](backend="torch", nonfinite="propagate")

    def step(j):
        flat, stats = aggregate(as_sources(j), agg.weighting, backend="torch", nonfinite="propagate")
        return flat, stats.conflicts

    j = make_jacobian("conflicting", 5, 64, seed=9)
    flat, _ = torch.compile(step, fullgraph=True, backend="eager")(j)
    torch.testing.assert_close(flat, agg(j), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["mgda", "upgrad", "dualproj"])
@pytest.mark.parametrize(
    "kind,k,n", cases(ks=(2, 5, 8), n=40) + [("random", 8, 3), ("low_rank", 8, 2), ("scaled", 8, 4)]
)
def test_interior_point_path_agrees_with_enumeration(monkeypatch, name, kind, k, n):
    # The path beyond ENUMERATION_MAX_K sources, forced on small K where every support is checked.
    j = make_jacobian(kind, k, n, seed=10)
    exact = FACTORIES[name]()(j)
    # _canonical holds the solvers' own reference to the limit (MGDA, UPGrad and DualProj call it).
    monkeypatch.setattr(canonical_module, "ENUMERATION_MAX_K", 0)
    interior = FACTORIES[name]()
    calls = []
    real = canonical_module.interior_point
    monkeypatch.setattr(canonical_module, "interior_point", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    assert (interior(j) - exact).norm() <= 1e-9 * j.norm(dim=1).max()
    assert calls  # the interior point did run


@pytest.mark.parametrize("name", ["upgrad", "mgda", "pcgrad", "nash_mtl", "modo"])
def test_gramian_weighting_gives_torchjds_call_shape(name):
    j = torch.randn(4, 30, dtype=torch.float32)
    gram = j @ j.T
    kwargs = {"shuffle": False} if name == "pcgrad" else {}
    weights = build_aggregator(name, **kwargs).gramian_weighting(gram)
    assert weights.dtype == torch.float32 and weights.shape == (4,)
    out = build_aggregator(name, **kwargs)(j)
    torch.testing.assert_close(weights @ j, out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="K x K matrix"):
        build_aggregator(name).gramian_weighting(j)
