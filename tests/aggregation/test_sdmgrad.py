"""SDMGrad (Xiao et al. 2023, Algorithm 1) against the paper's inner steps on J, TorchJD's
SDMGradWeighting, and the state protocol."""

from __future__ import annotations

import math

import pytest
import torch

from tolaria.aggregation.sdmgrad import SDMGrad

from . import stateful_checks as checks


def sdmgrad_reference(pairs, thirds, lr, momentum, n_iter, lam, pref=None) -> list[torch.Tensor]:
    """Per step: ``n_iter`` projected momentum-SGD steps on w of 1/2 |J^T (w + lam w~)|^2, whose
    stochastic gradient is J_1 (J_2^T (w + lam w~)), scaled by 1 / (s^2 + 1e-8) with s the mean of
    sqrt(max(g1_i . g2_i, 0)) (section 6.1); w carried over from the last step (uniform at first);
    d = J_3^T (w + lam w~) / (1 + lam)."""
    k = thirds[0].shape[0]
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    wt = torch.full((k,), 1.0 / k, dtype=torch.float64) if pref is None else torch.tensor(pref, dtype=torch.float64)
    out = []
    for (j1, j2), j3 in zip(pairs, thirds):
        s = sum(math.sqrt(max(float(j1[i] @ j2[i]), 0.0)) for i in range(k)) / k
        velocity = None
        for _ in range(n_iter):
            g = j1 @ (j2.T @ (w + lam * wt)) / (s * s + 1e-8)
            velocity = g if velocity is None else momentum * velocity + g
            w = checks.project_onto_simplex_reference(w - lr * velocity)
        out.append(j3.T @ (w + lam * wt) / (1 + lam))
    return out


CASES = [
    {},  # TorchJD's defaults: lr 10, momentum 0.5, 20 steps, lambda_ 0.3
    {"lr": 0.5, "momentum": 0.0, "n_iter": 5, "lambda_": 0.0},
    {"lr": 2.0, "momentum": 0.9, "n_iter": 7, "lambda_": 1.5, "pref_vector": [0.5, 0.3, 0.2]},
]


def _ids(cases):
    return [",".join(f"{k}={v}" for k, v in c.items()) or "defaults" for c in cases]


@pytest.mark.parametrize("kwargs", CASES, ids=_ids(CASES))
def test_follows_the_papers_steps_over_several_calls(kwargs):
    k = 3
    js = checks.jacobians(k, 40, 6, seed=5)
    args = {"lr": 10.0, "momentum": 0.5, "n_iter": 20, "lambda_": 0.3, **kwargs}
    expected = sdmgrad_reference(
        [(j, j) for j in js], js, args["lr"], args["momentum"], args["n_iter"], args["lambda_"], args.get("pref_vector")
    )
    agg = SDMGrad(**kwargs)
    for step, (j, ref) in enumerate(zip(js, expected)):
        got = agg(j)
        assert (got - ref).abs().max() <= 1e-11 * ref.abs().max(), f"step {step}"


@pytest.mark.parametrize("k", [1, 2, 5])
def test_follows_the_papers_steps_for_other_k(k):
    js = checks.jacobians(k, 25, 5, seed=10 + k)
    expected = sdmgrad_reference([(j, j) for j in js], js, 1.0, 0.5, 10, 0.3)
    agg = SDMGrad(lr=1.0, n_iter=10)
    for j, ref in zip(js, expected):
        assert (agg(j) - ref).abs().max() <= 1e-11 * ref.abs().max()


def test_weights_sum_to_one_and_lambda_zero_is_on_the_simplex():
    agg = SDMGrad(lambda_=0.0, lr=1.0)
    for j in checks.jacobians(4, 30, 4, seed=6):
        _, stats = agg(j, return_stats=True)
        assert (stats.weights >= 0).all() and abs(stats.weights.sum().item() - 1) <= 1e-14


def test_the_scale_of_the_gradients_does_not_change_the_weights():
    js = checks.jacobians(4, 30, 4, seed=7)
    a, b = SDMGrad(), SDMGrad()
    for j in js:
        _, sa = a(j, return_stats=True)
        _, sb = b(1e3 * j, return_stats=True)
        torch.testing.assert_close(sa.weights, sb.weights, rtol=1e-9, atol=1e-12)


def test_two_sample_form_follows_the_paper():
    stream = checks.jacobians(3, 30, 9, seed=8)
    pairs, thirds = list(zip(stream[0::3], stream[1::3])), stream[2::3]
    expected = sdmgrad_reference(pairs, thirds, 10.0, 0.5, 20, 0.3)
    agg = SDMGrad()
    for (j1, j2), j3, ref in zip(pairs, thirds, expected):
        w = agg.weights_from_cross(j1 @ j2.T)
        assert ((w @ j3) - ref).abs().max() <= 1e-11 * ref.abs().max()


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(3, 2), torch.ones(0, 0)])
def test_two_sample_form_refuses_what_is_not_a_square_matrix(bad):
    with pytest.raises(ValueError, match="SDMGrad.weights_from_cross needs"):
        SDMGrad().weights_from_cross(bad)


@pytest.mark.parametrize("kwargs", CASES, ids=_ids(CASES))
def test_agrees_with_torchjd_over_consecutive_calls(kwargs):
    tjd = pytest.importorskip("torchjd.aggregation")
    theirs_kwargs = dict(kwargs)
    if "pref_vector" in theirs_kwargs:
        theirs_kwargs["pref_vector"] = torch.tensor(theirs_kwargs["pref_vector"], dtype=torch.float64)
    ours, theirs = SDMGrad(**kwargs), tjd.SDMGradWeighting(**theirs_kwargs)
    for j in checks.jacobians(3, 50, 6, seed=30):
        _, stats = ours(j, return_stats=True)
        assert (stats.weights - theirs(j @ j.T)).abs().max() <= 1e-11


def test_two_sample_form_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    ours, theirs = SDMGrad(), tjd.SDMGradWeighting()
    stream = checks.jacobians(4, 30, 8, seed=31)
    for j1, j2 in zip(stream[0::2], stream[1::2]):
        cross = j1 @ j2.T
        assert (ours.weights_from_cross(cross) - theirs(cross)).abs().max() <= 1e-11


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"momentum": "0.5"}, "momentum"),
        ({"n_iter": 0}, "n_iter"),
        ({"n_iter": 2.0}, "n_iter"),
        ({"n_iter": True}, "n_iter"),
        ({"lambda_": -0.3}, "lambda_"),
        ({"lambda_": float("nan")}, "lambda_"),
        ({"pref_vector": [[0.5, 0.5]]}, "pref_vector"),
        ({"pref_vector": [0.5, float("nan")]}, "pref_vector"),
        ({"pref_vector": "ab"}, "pref_vector"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"SDMGrad {name} must be"):
        SDMGrad(**kwargs)


def test_a_preference_vector_of_the_wrong_length_is_refused_at_the_call():
    with pytest.raises(ValueError, match="SDMGrad pref_vector has 3 weights but got 4 gradient sources"):
        SDMGrad(pref_vector=[0.5, 0.3, 0.2])(torch.randn(4, 10))


def test_state_dict_round_trip_is_bit_for_bit(tmp_path):
    checks.assert_state_round_trip(lambda: SDMGrad(lr=1.0, n_iter=3), checks.jacobians(4, 30, 8, seed=40), tmp_path)


def test_state_dict_is_a_copy_on_the_cpu():
    assert SDMGrad().state_dict() == {"w": None}
    checks.assert_state_is_a_copy(lambda: SDMGrad(lr=1.0, n_iter=3), checks.jacobians(3, 20, 5, seed=41))


def test_reset_starts_over():
    checks.assert_reset_starts_over(lambda: SDMGrad(lr=1.0, n_iter=3), checks.jacobians(3, 20, 4, seed=42))


def test_a_change_of_k_warns_and_starts_over():
    checks.assert_k_change_warns_and_starts_over(lambda: SDMGrad(lr=1.0, n_iter=3), "SDMGrad", 3, 20)


@pytest.mark.parametrize(
    "state,match",
    [
        (None, "needs the dict"),
        ({"lambda": None}, "needs the keys"),
        ({"w": torch.ones(())}, "1-D floating"),
        ({"w": torch.tensor([0.5, float("inf")])}, "NaN or inf"),
        ({"w": 3.0}, "must be a tensor or None"),
    ],
)
def test_load_state_dict_refuses_bad_states(state, match):
    agg = SDMGrad()
    with pytest.raises(ValueError, match=match):
        agg.load_state_dict(state)


def test_a_non_finite_step_returns_nan_and_keeps_the_state():
    js = checks.jacobians(3, 20, 4, seed=44)
    expected = checks.run(SDMGrad(lr=1.0, n_iter=3, nonfinite="propagate"), js)
    agg = SDMGrad(lr=1.0, n_iter=3, nonfinite="propagate")
    got = [agg(js[0]), agg(js[1])]
    bad = js[1].clone()
    bad[0, 3] = float("inf")
    assert torch.isnan(agg(bad)).all()
    got += [agg(js[2]), agg(js[3])]
    checks.assert_bitwise(got, expected)


def test_float32_input_keeps_its_dtype_and_device():
    checks.assert_float32_kept(lambda: SDMGrad(lr=1.0, n_iter=5), checks.jacobians(4, 30, 4, seed=46))


def test_backends_agree_over_several_calls():
    checks.assert_backends_agree(lambda b: SDMGrad(backend=b), checks.jacobians(4, 50, 4, seed=47), rtol=1e-9)


def test_permuting_the_sources_permutes_the_weights():
    js = checks.jacobians(5, 30, 4, seed=48)
    order = torch.tensor([3, 0, 4, 1, 2])
    plain, permuted = SDMGrad(lr=1.0), SDMGrad(lr=1.0)
    for j in js:
        _, a = plain(j, return_stats=True)
        _, b = permuted(j[order], return_stats=True)
        torch.testing.assert_close(b.weights, a.weights[order], rtol=1e-10, atol=1e-13)


def test_repr():
    assert repr(SDMGrad(pref_vector=[0.5, 0.5], backend="cpu")) == (
        "SDMGrad(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3, pref_vector=[0.5, 0.5], backend='cpu', "
        "nonfinite='raise')"
    )
