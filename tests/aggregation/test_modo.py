"""MoDo (Chen et al. 2023, Algorithm 1) against the paper's update on J, TorchJD's MoDoWeighting, and
the state protocol."""

from __future__ import annotations

import pytest
import torch

from tolaria.aggregation.modo import MoDo

from . import stateful_checks as checks

# gamma G of order 1: the weights' steps neither vanish nor throw them onto a vertex at every call.
SCALE = 0.2


def modo_reference(js_lambda, js_step, gamma: float, rho: float) -> list[torch.Tensor]:
    """lambda <- P(lambda - gamma (J_1 J_2^T lambda + rho lambda)) from uniform; d = J_3^T lambda,
    written on the Jacobians as the paper states it (J_1 J_2^T lambda = J_1 (J_2^T lambda))."""
    k = js_step[0].shape[0]
    lam = torch.full((k,), 1.0 / k, dtype=torch.float64)
    out = []
    for (j1, j2), j3 in zip(js_lambda, js_step):
        lam = checks.project_onto_simplex_reference(lam - gamma * (j1 @ (j2.T @ lam) + rho * lam))
        out.append(j3.T @ lam)
    return out


@pytest.mark.parametrize("gamma,rho", [(0.1, 0.1), (0.02, 0.0), (0.5, 1.0)])
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_follows_the_papers_update_over_several_steps(k, gamma, rho):
    js = checks.jacobians(k, 40, 6, seed=k, scale=0.25)
    expected = modo_reference([(j, j) for j in js], js, gamma, rho)
    agg = MoDo(gamma, rho)
    for step, (j, ref) in enumerate(zip(js, expected)):
        got = agg(j)
        assert (got - ref).abs().max() <= 1e-12 * ref.abs().max().clamp_min(1e-300), f"step {step}"


def test_the_weights_leave_uniform_and_stay_on_the_simplex():
    agg = MoDo(0.3, 0.0)
    for j in checks.jacobians(4, 30, 5, seed=3, scale=SCALE):
        _, stats = agg(j, return_stats=True)
        assert (stats.weights >= 0).all() and abs(stats.weights.sum().item() - 1) <= 1e-14
    assert not torch.allclose(stats.weights, torch.full((4,), 0.25, dtype=torch.float64))


def test_two_sample_form_follows_the_paper():
    k = 4
    stream = checks.jacobians(k, 30, 9, seed=7, scale=SCALE)
    pairs, thirds = list(zip(stream[0::3], stream[1::3])), stream[2::3]
    expected = modo_reference(pairs, thirds, 0.2, 0.05)
    agg = MoDo(0.2, 0.05)
    for (j1, j2), j3, ref in zip(pairs, thirds, expected):
        w = agg.weights_from_cross(j1 @ j2.T)
        assert w.dtype == torch.float64
        assert ((w @ j3) - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_two_sample_form_advances_the_same_state_as_calls():
    js = checks.jacobians(3, 20, 4, seed=8, scale=SCALE)
    by_call = MoDo(0.4)
    for j in js:
        by_call(j)
    by_cross = MoDo(0.4)
    for j in js:
        by_cross.weights_from_cross(j @ j.T)
    torch.testing.assert_close(by_call.state_dict()["lambda"], by_cross.state_dict()["lambda"], rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    "bad", [torch.ones(3), torch.ones(2, 3), [[1.0]], torch.ones(0, 0), torch.ones(2, 2, dtype=torch.int64)]
)
def test_two_sample_form_refuses_what_is_not_a_square_matrix(bad):
    with pytest.raises(ValueError, match="MoDo.weights_from_cross needs"):
        MoDo().weights_from_cross(bad)


def test_agrees_with_torchjd_over_consecutive_calls():
    tjd = pytest.importorskip("torchjd.aggregation")
    for k, gamma, rho in [(2, 0.1, 0.1), (3, 0.5, 0.0), (5, 0.05, 0.3)]:
        ours, theirs = MoDo(gamma, rho), tjd.MoDoWeighting(gamma=gamma, rho=rho)
        for j in checks.jacobians(k, 50, 6, seed=20 + k, scale=SCALE):
            _, stats = ours(j, return_stats=True)
            reference = theirs(j @ j.T)
            assert (stats.weights - reference).abs().max() <= 1e-13, f"K={k}"


def test_two_sample_form_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    ours, theirs = MoDo(0.3, 0.1), tjd.MoDoWeighting(gamma=0.3, rho=0.1)
    stream = checks.jacobians(4, 30, 8, seed=31, scale=SCALE)
    for j1, j2 in zip(stream[0::2], stream[1::2]):
        cross = j1 @ j2.T  # not symmetric
        assert (ours.weights_from_cross(cross) - theirs(cross)).abs().max() <= 1e-13


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"gamma": float("inf")}, "gamma"),
        ({"gamma": "0.1"}, "gamma"),
        ({"gamma": True}, "gamma"),
        ({"rho": -1e-3}, "rho"),
        ({"rho": float("nan")}, "rho"),
        ({"rho": None}, "rho"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"MoDo {name} must be"):
        MoDo(**kwargs)


def test_state_dict_round_trip_is_bit_for_bit(tmp_path):
    checks.assert_state_round_trip(lambda: MoDo(0.3, 0.05), checks.jacobians(4, 30, 8, seed=40, scale=SCALE), tmp_path)


def test_state_dict_is_a_copy_on_the_cpu():
    assert MoDo().state_dict() == {"lambda": None}
    checks.assert_state_is_a_copy(lambda: MoDo(0.3), checks.jacobians(3, 20, 5, seed=41, scale=SCALE))


def test_reset_starts_over():
    checks.assert_reset_starts_over(lambda: MoDo(0.3), checks.jacobians(3, 20, 4, seed=42, scale=SCALE))


def test_loading_the_empty_state_starts_over():
    js = checks.jacobians(3, 20, 3, seed=43, scale=SCALE)
    agg = MoDo(0.3)
    first = checks.run(agg, js)
    agg.load_state_dict({"lambda": None})
    checks.assert_bitwise(checks.run(agg, js), first)


def test_a_change_of_k_warns_and_starts_over():
    checks.assert_k_change_warns_and_starts_over(lambda: MoDo(0.3), "MoDo", 3, 20)


@pytest.mark.parametrize(
    "state,match",
    [
        ([], "needs the dict"),
        ({}, "needs the keys"),
        ({"w": None}, "needs the keys"),
        ({"lambda": None, "extra": 1}, "needs the keys"),
        ({"lambda": [0.5, 0.5]}, "must be a tensor or None"),
        ({"lambda": torch.ones(2, 2)}, "1-D floating"),
        ({"lambda": torch.ones(3, dtype=torch.int64)}, "1-D floating"),
        ({"lambda": torch.tensor([0.5, float("nan")], dtype=torch.float64)}, "NaN or inf"),
    ],
)
def test_load_state_dict_refuses_bad_states(state, match):
    agg = MoDo()
    with pytest.raises(ValueError, match=match):
        agg.load_state_dict(state)
    assert agg.state_dict() == {"lambda": None}  # nothing half-loaded


def test_a_non_finite_step_returns_nan_and_keeps_the_state():
    js = checks.jacobians(3, 20, 4, seed=44, scale=SCALE)
    clean = MoDo(0.3, nonfinite="propagate")
    expected = checks.run(clean, js)
    agg = MoDo(0.3, nonfinite="propagate")
    got = [agg(js[0]), agg(js[1])]
    bad = js[1].clone()
    bad[2, 5] = float("nan")
    assert torch.isnan(agg(bad)).all()
    got += [agg(js[2]), agg(js[3])]
    checks.assert_bitwise(got, expected)


def test_the_default_mode_refuses_a_non_finite_step_and_keeps_the_state():
    js = checks.jacobians(3, 20, 3, seed=45, scale=SCALE)
    expected = checks.run(MoDo(0.3), js)
    agg = MoDo(0.3)
    agg(js[0])
    bad = js[1].clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        agg(bad)
    checks.assert_bitwise([agg(js[1]), agg(js[2])], expected[1:])


def test_float32_input_keeps_its_dtype_and_device():
    checks.assert_float32_kept(lambda: MoDo(0.3), checks.jacobians(4, 30, 4, seed=46, scale=SCALE))


def test_backends_agree_over_several_calls():
    checks.assert_backends_agree(lambda b: MoDo(0.3, 0.05, backend=b), checks.jacobians(4, 50, 4, seed=47, scale=SCALE))


def test_permuting_the_sources_permutes_the_weights():
    js = checks.jacobians(5, 30, 4, seed=48, scale=SCALE)
    order = torch.tensor([3, 0, 4, 1, 2])
    plain, permuted = MoDo(0.3), MoDo(0.3)
    for j in js:
        _, a = plain(j, return_stats=True)
        _, b = permuted(j[order], return_stats=True)
        torch.testing.assert_close(b.weights, a.weights[order], rtol=1e-12, atol=1e-15)


def test_repr():
    assert repr(MoDo(0.2, 0.0, backend="torch")) == "MoDo(gamma=0.2, rho=0.0, backend='torch', nonfinite='raise')"
