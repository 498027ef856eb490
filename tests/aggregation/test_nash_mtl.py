"""NashMTL against its definition (Navon et al. 2022, Theorem 3.2 and Algorithm 1): (G w)_i = 1 / w_i,
w > 0, then |J^T w| <= max_norm, solved anew every ``update_weights_every`` calls."""

import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

from tolaria.aggregation.nash_mtl import NashMTL


def bargaining_weights(j: torch.Tensor) -> torch.Tensor:
    """The paper's equation on J itself, g_i . (J^T w) = 1 / w_i, by SciPy's bounded least squares."""
    jn = j.to(torch.float64).numpy()
    res = scipy.optimize.least_squares(
        lambda w: jn @ (jn.T @ w) - 1.0 / w,
        np.ones(jn.shape[0]),
        bounds=(1e-12, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=10_000,
    )
    return torch.from_numpy(res.x)


def nash_reference(js: list[torch.Tensor], max_norm: float = 1.0, every: int = 1) -> list[torch.Tensor]:
    """Algorithm 1 over a sequence of calls: solve on every ``every``-th, reuse between, bound the norm."""
    results, solution = [], None
    for step, j in enumerate(js):
        j = j.to(torch.float64)
        if step % every == 0:
            solution = bargaining_weights(j)
        d = solution @ j
        if max_norm > 0 and d.norm() > max_norm:
            d = d * (max_norm / d.norm())
        results.append(d)
    return results


def _conflicting(k: int, seed: int, n: int = 60, spread: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-spread, spread, k, dtype=torch.float64)[:, None]
    j = torch.randn(k, n, generator=gen, dtype=torch.float64) * scales
    if k > 1:
        j[1] = -0.7 * j[0] + 0.3 * j[1]
    return j


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool((a.to(torch.float64) - b.to(torch.float64)).norm() <= rel * b.to(torch.float64).norm())


@pytest.mark.parametrize("max_norm", [0.0, 1.0, 50.0])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_matches_the_definition(k, max_norm):
    j = _conflicting(k, seed=k)
    [reference] = nash_reference([j], max_norm)
    assert _close(NashMTL(max_norm=max_norm)(j), reference, 1e-8)


@pytest.mark.parametrize("spread", [0.0, 2.0, 4.0])
def test_the_weights_solve_the_bargaining_equation_and_every_source_progresses(spread):
    # Gradient norms spanning up to 1e8: the default budget still reaches the solution.
    j = _conflicting(6, seed=2, spread=spread)
    d, stats = NashMTL(max_norm=0.0)(j, return_stats=True)
    w, g = stats.weights, stats.gram
    assert (w > 0).all()
    torch.testing.assert_close((g @ w) * w, torch.ones(6, dtype=torch.float64), rtol=1e-8, atol=0)
    assert ((j @ d) > 0).all()
    assert stats.conflicts == int((g < 0).sum() // 2)


def test_the_norm_is_bounded_by_max_norm_and_sqrt_k_before():
    j = _conflicting(4, seed=3)
    assert NashMTL(max_norm=0.0)(j).norm().item() == pytest.approx(2.0, rel=1e-10)  # sqrt(K)
    assert NashMTL(max_norm=0.5)(j).norm().item() == pytest.approx(0.5, rel=1e-12)
    torch.testing.assert_close(NashMTL(max_norm=3.0)(j), NashMTL(max_norm=0.0)(j), rtol=0, atol=0)


def test_weights_are_reused_between_updates_and_rescaled_against_each_call():
    js = [_conflicting(3, seed=s) * (1 + s) for s in range(7)]
    for every, max_norm in [(3, 1.0), (2, 0.0), (1, 1.0)]:
        agg = NashMTL(update_weights_every=every, max_norm=max_norm)
        for ours, reference in zip([agg(j) for j in js], nash_reference(js, max_norm, every), strict=True):
            assert _close(ours, reference, 1e-8)


def test_agrees_with_torchjd_where_its_solver_converges():
    tjd = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    # Well-conditioned inputs (ECOS reaches its tolerance); TorchJD's answer is within about 1e-7.
    for k, every in [(2, 1), (3, 2), (5, 1), (8, 3)]:
        ours, theirs = NashMTL(k, update_weights_every=every), tjd.NashMTL(k, update_weights_every=every)
        for step in range(4):
            gen = torch.Generator().manual_seed(100 * k + step)
            j = torch.randn(k, 40, generator=gen, dtype=torch.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # cvxpy's own warnings about ECOS
                expected = theirs(j)
            assert _close(ours(j), expected, 2e-6)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"n_tasks": 0}, "n_tasks"),
        ({"n_tasks": 2.0}, "n_tasks"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"max_norm": float("inf")}, "max_norm"),
        ({"max_norm": "1"}, "max_norm"),
        ({"update_weights_every": 0}, "update_weights_every"),
        ({"update_weights_every": True}, "update_weights_every"),
        ({"optim_niter": 0}, "optim_niter"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"NashMTL {name} must be"):
        NashMTL(**kwargs)


def test_n_tasks_fixes_k():
    with pytest.raises(ValueError, match=r"NashMTL\(n_tasks=3\) was given 4 gradient sources"):
        NashMTL(3)(torch.randn(4, 5))


def test_a_new_k_without_n_tasks_warns_and_starts_over():
    agg = NashMTL(update_weights_every=5)
    agg(_conflicting(3, seed=1))
    j = _conflicting(4, seed=2)
    with pytest.warns(UserWarning, match="NashMTL was given 4 sources after 3"):
        out = agg(j)
    torch.testing.assert_close(out, NashMTL()(j), rtol=0, atol=0)
    assert agg.state_dict()["step"] == 1


def _calls(agg, js):
    return [agg(j) for j in js]


@pytest.mark.parametrize("through_disk", [False, True])
def test_state_dict_round_trip_repeats_the_calls_bit_for_bit(tmp_path, through_disk):
    js = [_conflicting(4, seed=s) * (1 + 0.5 * s) for s in range(8)]
    saved = NashMTL(4, update_weights_every=3)
    _calls(saved, js[:4])  # mid-cycle: the next two calls reuse the solution
    state = saved.state_dict()
    if through_disk:
        torch.save(state, tmp_path / "nash.pt")
        state = torch.load(tmp_path / "nash.pt", weights_only=True)
    assert state["weights"].device.type == "cpu" and isinstance(state["step"], int)
    loaded = NashMTL(4, update_weights_every=3)
    loaded.load_state_dict(state)
    for a, b in zip(_calls(saved, js[4:]), _calls(loaded, js[4:]), strict=True):
        assert torch.equal(a, b)


def test_state_dict_is_a_copy():
    agg = NashMTL(update_weights_every=2)
    agg(_conflicting(3, seed=1))
    state = agg.state_dict()
    before = state["weights"].clone()
    agg(_conflicting(3, seed=2))
    agg(_conflicting(3, seed=3))
    assert torch.equal(state["weights"], before) and state["step"] == 1


def test_reset_starts_over():
    js = [_conflicting(3, seed=s) * (1 + s) for s in range(4)]
    agg = NashMTL(update_weights_every=4)
    first = _calls(agg, js)
    agg.reset()
    assert agg.state_dict() == {"step": 0, "weights": None}
    assert all(torch.equal(a, b) for a, b in zip(first, _calls(agg, js), strict=True))
    # The fifth call solves anew, on its own gradients, as a fresh aggregator's first call.
    assert torch.equal(agg(js[1]), NashMTL()(js[1]))


@pytest.mark.parametrize(
    "state,match",
    [
        ({"step": 1}, "needs the keys"),
        ({"step": -1, "weights": None}, "'step' must be an integer"),
        ({"step": 2, "weights": None}, "no weights"),
        ({"step": 1, "weights": [1.0, 2.0]}, "1-d float tensor"),
        ({"step": 1, "weights": torch.ones(2, 2)}, "1-d float tensor"),
        ({"step": 1, "weights": torch.ones(2)}, "cannot load a state with 2 weights"),
        ({"step": 1, "weights": torch.tensor([1.0, float("nan"), 1.0])}, "NaN or inf"),
    ],
)
def test_load_state_dict_refuses_bad_states(state, match):
    with pytest.raises(ValueError, match=match):
        NashMTL(3).load_state_dict(state)


def test_propagate_keeps_the_last_finite_solution_for_the_calls_that_reuse_it():
    j = _conflicting(3, seed=4)
    agg = NashMTL(update_weights_every=2, nonfinite="propagate")
    bad = j.clone()
    bad[0, 0] = float("nan")
    assert torch.isnan(agg(bad)).all()
    assert torch.isfinite(agg.state_dict()["weights"]).all()  # ones, TorchJD's start
    reference = NashMTL(update_weights_every=2)
    reference(j)
    reference.load_state_dict({"step": 1, "weights": torch.ones(3, dtype=torch.float64)})
    assert torch.equal(agg(j), reference(j))
    with pytest.raises(ValueError, match="non-finite"):
        NashMTL()(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backends_agree_and_keep_dtype_and_device(dtype):
    j = _conflicting(5, seed=7, n=3001).to(dtype)
    results = {}
    for backend in ("cpu", "torch", "triton"):
        out = torch.empty(3001, dtype=dtype)
        agg = NashMTL(backend=backend, update_weights_every=2)
        result, stats = agg(j, return_stats=True, out=out)
        assert result is out and out.dtype == dtype and out.device == j.device
        torch.testing.assert_close(out.double(), stats.weights @ j.double(), rtol=1e-5, atol=1e-6)
        results[backend] = (out, agg(j * 2))  # reuses the solution, scaled to max_norm again
    reference = NashMTL()(j.to(torch.float64))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for first, second in results.values():
        assert _close(first, reference, tol) and _close(second, reference, tol)
        assert second.dtype == dtype


def test_repr_names_the_arguments():
    assert repr(NashMTL(3, 0.5, 2, 10)) == (
        "NashMTL(n_tasks=3, max_norm=0.5, update_weights_every=2, optim_niter=10, backend='auto', nonfinite='raise')"
    )
