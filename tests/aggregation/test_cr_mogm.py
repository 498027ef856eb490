"""CR-MOGM (Zhou et al. 2022): the moving average of a wrapped method's weights, against the paper's
update on J (with MGDA's weights from a plain active-set solve), TorchJD's CRMOGMWeighting, and the
state protocol (the wrapped aggregator's state included)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tolaria.aggregation import MGDA, Mean, Random, UPGrad
from tolaria.aggregation.cr_mogm import CRMOGM
from tolaria.aggregation.modo import MoDo

from . import stateful_checks as checks


def mgda_weights_reference(j: torch.Tensor) -> np.ndarray:
    """argmin_{w >= 0, sum w = 1} |J^T w|^2 by its optimality conditions on every support S:
    G_SS w_S = mu 1, sum w_S = 1, w_S >= 0, and (G w)_i >= mu = w^T G w for every i. Full-rank J:
    exactly one support passes."""
    g = (j @ j.T).numpy()
    k = g.shape[0]
    found = []
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            system = np.zeros((size + 1, size + 1))
            system[:size, :size] = g[np.ix_(s, s)]
            system[:size, size] = -1.0
            system[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            solution = np.linalg.solve(system, rhs)
            w = np.zeros(k)
            w[s] = solution[:size]
            mu = solution[size]
            scale = np.abs(g).max()
            if (w >= -1e-12).all() and (g @ w >= mu - 1e-10 * scale).all():
                found.append(w)
    assert len(found) >= 1
    return found[0]


def cr_mogm_reference(js, alphas, initial=None) -> list[torch.Tensor]:
    """lambda_k = alpha_k lambda_{k-1} + (1 - alpha_k) lambda^_k with lambda^_k MGDA's weights of step k
    and lambda_0 = lambda^_1 (or ``initial``); the direction is J_k^T lambda_k."""
    lam = None if initial is None else np.asarray(initial, dtype=np.float64)
    out = []
    for j, alpha in zip(js, alphas):
        hat = mgda_weights_reference(j)
        previous = hat if lam is None else lam
        lam = alpha * previous + (1 - alpha) * hat
        out.append(torch.from_numpy(lam) @ j)
    return out


def _assert_close(got, ref, rtol):
    assert (got - ref).abs().max() <= rtol * ref.abs().max(), f"off by {(got - ref).abs().max().item():.3g}"


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_follows_the_papers_average_of_mgda_weights(k, alpha):
    js = checks.jacobians(k, 40, 6, seed=k)
    expected = cr_mogm_reference(js, [alpha] * len(js))
    agg = CRMOGM(alpha=alpha)
    for j, ref in zip(js, expected):
        _assert_close(agg(j), ref, 1e-9)


def test_initial_weights_are_lambda_zero():
    js = checks.jacobians(3, 30, 5, seed=4)
    initial = [0.2, 0.5, 0.3]
    expected = cr_mogm_reference(js, [0.7] * len(js), initial)
    agg = CRMOGM("mgda", 0.7, initial)
    for j, ref in zip(js, expected):
        _assert_close(agg(j), ref, 1e-9)


def test_an_alpha_schedule_set_between_calls_is_followed():
    js = checks.jacobians(3, 30, 6, seed=5)
    alphas = [0.0, 0.2, 0.4, 0.6, 0.8, 0.95]  # Corollary 1: alpha grows as the learning rate decays
    expected = cr_mogm_reference(js, alphas)
    agg = CRMOGM()
    for j, alpha, ref in zip(js, alphas, expected):
        agg.alpha = alpha
        _assert_close(agg(j), ref, 1e-9)


def test_the_first_call_returns_the_wrapped_weights_exactly():
    j = checks.jacobians(4, 30, 1, seed=6)[0]
    assert torch.equal(CRMOGM(alpha=0.9)(j), MGDA()(j))


def test_alpha_zero_is_the_wrapped_aggregator_at_every_call():
    js = checks.jacobians(4, 30, 4, seed=7)
    checks.assert_bitwise(checks.run(CRMOGM(alpha=0.0), js), checks.run(MGDA(), js))


def test_alpha_one_keeps_the_first_weights():
    js = checks.jacobians(3, 30, 4, seed=8)
    agg = CRMOGM(alpha=1.0)
    _, first = agg(js[0], return_stats=True)
    for j in js[1:]:
        _, stats = agg(j, return_stats=True)
        assert torch.equal(stats.weights, first.weights)


def test_wraps_an_aggregator_instance_and_a_name():
    js = checks.jacobians(3, 30, 4, seed=9)
    checks.assert_bitwise(checks.run(CRMOGM(UPGrad(), 0.6), js), checks.run(CRMOGM("UPGrad", 0.6), js))
    assert CRMOGM("upgrad").wide_combine and CRMOGM().wide_combine and not CRMOGM(MoDo()).wide_combine


def test_the_constant_weights_of_the_mean_are_unchanged():
    js = checks.jacobians(3, 30, 3, seed=10)
    for got, ref in zip(checks.run(CRMOGM(Mean(), 0.9), js), checks.run(Mean(), js)):
        _assert_close(got, ref, 1e-15)


def test_agrees_with_torchjd_wrapping_a_stateful_weighting():
    tjd = pytest.importorskip("torchjd.aggregation")
    ours = CRMOGM(MoDo(gamma=0.5, rho=0.1), alpha=0.8)
    theirs = tjd.CRMOGMWeighting(tjd.MoDoWeighting(gamma=0.5, rho=0.1), alpha=0.8)
    for j in checks.jacobians(4, 30, 6, seed=11, scale=0.2):
        _, stats = ours(j, return_stats=True)
        assert (stats.weights - theirs(j @ j.T)).abs().max() <= 1e-13


def test_agrees_with_torchjd_wrapping_imtlg_with_initial_weights():
    tjd = pytest.importorskip("torchjd.aggregation")
    initial = [0.1, 0.2, 0.3, 0.4]
    ours = CRMOGM("imtlg", 0.6, initial)
    theirs = tjd.CRMOGMWeighting(tjd.IMTLGWeighting(), 0.6, torch.tensor(initial, dtype=torch.float64))
    for j in checks.jacobians(4, 30, 6, seed=12):
        _, stats = ours(j, return_stats=True)
        assert (stats.weights - theirs(j @ j.T)).abs().max() <= 1e-13


def test_agrees_with_torchjd_wrapping_mgda():
    tjd = pytest.importorskip("torchjd.aggregation")
    ours = CRMOGM(alpha=0.9)
    theirs = tjd.CRMOGMWeighting(tjd.MGDAWeighting(epsilon=1e-12, max_iters=20000), alpha=0.9)
    for j in checks.jacobians(4, 60, 5, seed=13):
        d = ours(j)
        ref = theirs(j @ j.T) @ j  # Frank-Wolfe approaches MGDA's optimum slowly
        assert (d - ref).norm() <= 1e-3 * ref.norm()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": "0.9"}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"weighting": "no_such_method"}, "weighting"),
        ({"weighting": 3}, "weighting"),
        ({"weighting": MGDA}, "weighting"),  # the class, not an instance
        ({"initial_weights": [[0.5, 0.5]]}, "initial_weights"),
        ({"initial_weights": []}, "initial_weights"),
        ({"initial_weights": [0.5, float("nan")]}, "initial_weights"),
        ({"initial_weights": ["a", "b"]}, "initial_weights"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"CRMOGM {name} must"):
        CRMOGM(**kwargs)


def test_assigning_a_bad_alpha_is_refused():
    agg = CRMOGM()
    with pytest.raises(ValueError, match="CRMOGM alpha must be a number in"):
        agg.alpha = 2.0
    assert agg.alpha == 0.9


def test_initial_weights_of_the_wrong_length_are_refused_at_the_call():
    with pytest.raises(ValueError, match="CRMOGM initial_weights has 3 weights but got 4 gradient sources"):
        CRMOGM(initial_weights=[0.2, 0.3, 0.5])(torch.randn(4, 10))


def test_state_dict_round_trip_is_bit_for_bit(tmp_path):
    checks.assert_state_round_trip(lambda: CRMOGM(alpha=0.7), checks.jacobians(4, 30, 8, seed=40), tmp_path)


def test_state_round_trip_carries_the_wrapped_aggregators_state(tmp_path):
    def make():
        return CRMOGM(Random(seed=3), alpha=0.5)

    checks.assert_state_round_trip(make, checks.jacobians(4, 30, 8, seed=41), tmp_path)
    agg = make()
    agg(checks.jacobians(4, 30, 1, seed=42)[0])
    assert set(agg.state_dict()["weighting"]) == {"generator"}


def test_state_round_trip_with_a_stateful_wrapped_weighting(tmp_path):
    def make():
        return CRMOGM(MoDo(0.3), alpha=0.5)

    checks.assert_state_round_trip(make, checks.jacobians(4, 30, 8, seed=43, scale=0.2), tmp_path)


def test_state_dict_is_a_copy_on_the_cpu():
    assert CRMOGM().state_dict() == {"lambda": None, "started": None, "weighting": {}}
    checks.assert_state_is_a_copy(lambda: CRMOGM(MoDo(0.3), alpha=0.5), checks.jacobians(3, 20, 5, seed=44, scale=0.2))


def test_reset_starts_over_and_resets_the_wrapped_aggregator():
    checks.assert_reset_starts_over(lambda: CRMOGM(alpha=0.7), checks.jacobians(3, 20, 4, seed=45))
    checks.assert_reset_starts_over(
        lambda: CRMOGM(MoDo(0.3), alpha=0.0), checks.jacobians(3, 20, 4, seed=46, scale=0.2)
    )


def test_a_change_of_k_warns_and_starts_over():
    checks.assert_k_change_warns_and_starts_over(lambda: CRMOGM(alpha=0.7), "CRMOGM", 3, 20)


@pytest.mark.parametrize(
    "state,match",
    [
        ("x", "needs the dict"),
        ({"lambda": None, "started": None}, "needs the keys"),
        ({"lambda": torch.ones(3), "started": None, "weighting": {}}, "'started' must be a bool"),
        ({"lambda": None, "started": True, "weighting": {}}, "'started' must be a bool"),
        ({"lambda": torch.ones(3), "started": 1, "weighting": {}}, "'started' must be a bool"),
        ({"lambda": torch.ones(3, 1), "started": True, "weighting": {}}, "1-D floating"),
        ({"lambda": None, "started": None, "weighting": None}, "'weighting' must be"),
        ({"lambda": None, "started": None, "weighting": {"generator": torch.ones(3)}}, "keeps no state"),
    ],
)
def test_load_state_dict_refuses_bad_states(state, match):
    agg = CRMOGM()
    with pytest.raises(ValueError, match=match):
        agg.load_state_dict(state)


def test_a_bad_wrapped_state_leaves_the_average_untouched():
    js = checks.jacobians(3, 20, 3, seed=47, scale=0.2)
    agg = CRMOGM(MoDo(0.3), alpha=0.5)
    checks.run(agg, js)
    before = agg.state_dict()
    bad = {"lambda": torch.full((3,), 1 / 3, dtype=torch.float64), "started": True, "weighting": {"w": None}}
    with pytest.raises(ValueError, match="MoDo.load_state_dict needs the keys"):
        agg.load_state_dict(bad)
    after = agg.state_dict()
    assert torch.equal(after["lambda"], before["lambda"])
    assert torch.equal(after["weighting"]["lambda"], before["weighting"]["lambda"])


def test_a_non_finite_step_returns_nan_and_keeps_the_average():
    js = checks.jacobians(3, 20, 4, seed=48)
    expected = checks.run(CRMOGM(alpha=0.6, nonfinite="propagate"), js)
    agg = CRMOGM(alpha=0.6, nonfinite="propagate")
    bad = js[0].clone()
    bad[1, 2] = float("nan")
    assert torch.isnan(agg(bad)).all()  # before any finite step: the average stays unset
    got = [agg(js[0]), agg(js[1])]
    assert torch.isnan(agg(bad)).all()  # after: it stays as it was
    got += [agg(js[2]), agg(js[3])]
    checks.assert_bitwise(got, expected)


def test_float32_input_keeps_its_dtype_and_device():
    checks.assert_float32_kept(lambda: CRMOGM(alpha=0.7), checks.jacobians(4, 30, 4, seed=49))


def test_backends_agree_over_several_calls():
    checks.assert_backends_agree(lambda b: CRMOGM(alpha=0.7, backend=b), checks.jacobians(4, 50, 4, seed=50), rtol=1e-9)


def test_repr():
    assert repr(CRMOGM(Mean(), 0.5, [0.5, 0.5], backend="torch")) == (
        "CRMOGM(weighting=Mean(backend='auto', nonfinite='raise'), alpha=0.5, initial_weights=[0.5, 0.5], "
        "backend='torch', nonfinite='raise')"
    )
