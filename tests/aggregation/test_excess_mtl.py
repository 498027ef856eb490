"""ExcessMTL against its definition (He et al. 2024, Equations 6, 7 and 9, Algorithm 1, Appendix C.1):
AdaGrad-diagonal excess risks over a baseline drive exponentiated-gradient weights on the simplex."""

import math

import pytest
import torch

from tolaria.aggregation.excess_mtl import ExcessMTL


def excess_reference(js: list[torch.Tensor], eta: float = 1.0, warmup: int = 0) -> list[torch.Tensor]:
    """The paper's loop in plain float64 on J, element by element of the update (no log space)."""
    k = js[0].shape[0]
    weights = [1.0 / k] * k
    s = torch.zeros_like(js[0], dtype=torch.float64)
    warm_sum, baseline, results = [0.0] * k, None, []
    for call, j in enumerate(js):
        j = j.to(torch.float64)
        s = s + j * j
        excess = [float((j[i] ** 2 / torch.sqrt(s[i] + 1e-7)).sum()) for i in range(k)]  # g^T H^-1 g
        if call < warmup:
            warm_sum = [a + b for a, b in zip(warm_sum, excess, strict=True)]
        else:
            if baseline is None:
                if warmup:
                    baseline = [a / warmup for a in warm_sum]
                    excess = [e / (b + 1e-7) for e, b in zip(excess, baseline, strict=True)]
                else:
                    baseline = excess
            else:
                excess = [e / (b + 1e-7) for e, b in zip(excess, baseline, strict=True)]
            top = max(excess)  # w_i exp(eta e_i) / sum_j w_j exp(eta e_j), shifted so that exp cannot overflow
            unnormalised = [w * math.exp(eta * (e - top)) for w, e in zip(weights, excess, strict=True)]
            weights = [u / sum(unnormalised) for u in unnormalised]
        results.append(torch.tensor(weights, dtype=torch.float64) @ j)
    return results


def _calls(k: int, n: int, count: int, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(k, 1, generator=gen, dtype=torch.float64) + 0.2
    return [(torch.randn(k, n, generator=gen, dtype=torch.float64) * scales).to(dtype) for _ in range(count)]


def _run(agg, js, **kwargs):
    return [agg(j, **kwargs) for j in js]


@pytest.mark.parametrize("eta,warmup", [(1.0, 0), (0.3, 0), (1.0, 3), (2.0, 1)])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_matches_the_definition(k, eta, warmup):
    js = _calls(k, 70, 8, seed=k)
    for ours, reference in zip(_run(ExcessMTL(eta, warmup), js), excess_reference(js, eta, warmup), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


def test_the_weights_favour_the_source_with_the_largest_excess_risk_and_stay_on_the_simplex():
    js = _calls(3, 50, 6, seed=9)
    for j in js:
        j[2] *= 0.01  # its excess risk over its baseline stays ~1; the others' grow as their gradients do
    for t, j in enumerate(js[1:], start=2):
        j[:2] *= t
    agg = ExcessMTL()
    for j in js:
        _, stats = agg(j, return_stats=True)
        assert stats.weights.sum().item() == pytest.approx(1.0, abs=1e-15) and (stats.weights > 0).all()
    assert stats.weights[2] < stats.weights[:2].min()


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    for k, eta, warmup in [(2, 1.0, 0), (4, 0.5, 2), (6, 2.0, 0)]:
        ours, theirs = ExcessMTL(eta, warmup), tjd.ExcessMTL(eta, warmup)
        for j in _calls(k, 200, 7, seed=20 + k):
            expected = theirs(j)
            torch.testing.assert_close(ours(j), expected, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(ours.state_dict()["sq_grad_sum"], theirs.weighting._sq_grad_sum, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"robust_step_size": 0.0}, "robust_step_size"),
        ({"robust_step_size": -1.0}, "robust_step_size"),
        ({"robust_step_size": float("nan")}, "robust_step_size"),
        ({"robust_step_size": "1"}, "robust_step_size"),
        ({"n_warmup_steps": -1}, "n_warmup_steps"),
        ({"n_warmup_steps": 1.0}, "n_warmup_steps"),
        ({"n_warmup_steps": True}, "n_warmup_steps"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"ExcessMTL {name} must be"):
        ExcessMTL(**kwargs)


@pytest.mark.parametrize("through_disk", [False, True])
@pytest.mark.parametrize("warmup,split", [(0, 1), (0, 4), (3, 2), (3, 3), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_state_dict_round_trip_repeats_the_calls_bit_for_bit(tmp_path, through_disk, warmup, split, dtype):
    js = _calls(3, 90, 8, seed=split, dtype=dtype)
    saved = ExcessMTL(0.7, warmup, nonfinite="propagate")
    _run(saved, js[:split])
    state = saved.state_dict()
    if through_disk:
        torch.save(state, tmp_path / "excess.pt")
        state = torch.load(tmp_path / "excess.pt", weights_only=True)
    assert all(v.device.type == "cpu" for v in state.values() if isinstance(v, torch.Tensor))
    assert state["n_steps"] == split and (state["baseline"] is None) == (split <= warmup)
    loaded = ExcessMTL(0.7, warmup, nonfinite="propagate")
    loaded.load_state_dict(state)
    rest = js[split:]
    for a, b in zip(_run(saved, rest, return_stats=True), _run(loaded, rest, return_stats=True), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1].weights, b[1].weights)


def test_state_dict_is_a_copy_and_load_copies():
    js = _calls(2, 30, 3, seed=1)
    agg = ExcessMTL()
    agg(js[0])
    state = agg.state_dict()
    before = {key: value.clone() for key, value in state.items() if isinstance(value, torch.Tensor)}
    other = ExcessMTL()
    other.load_state_dict(state)
    agg(js[1])
    other(js[1])
    assert all(torch.equal(state[key], value) for key, value in before.items())


def test_reset_starts_over():
    js = _calls(3, 40, 5, seed=3)
    agg = ExcessMTL(1.0, 2)
    first = _run(agg, js)
    agg.reset()
    fresh = {"weights": None, "sq_grad_sum": None, "baseline": None, "warmup_sum": None, "n_steps": 0}
    assert agg.state_dict() == fresh
    assert all(torch.equal(a, b) for a, b in zip(first, _run(agg, js), strict=True))


def test_a_new_k_or_n_warns_and_starts_over():
    agg = ExcessMTL()
    _run(agg, _calls(3, 40, 3, seed=1))
    for k, n in [(4, 40), (4, 41)]:
        js = _calls(k, n, 2, seed=k + n)
        with pytest.warns(UserWarning, match=f"ExcessMTL was given {k} sources of {n} elements"):
            outs = _run(agg, js)
        assert all(torch.equal(a, b) for a, b in zip(outs, _run(ExcessMTL(), js), strict=True))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"extra": 1}, "needs the keys"),
        ({"n_steps": -1}, "'n_steps' must be an integer"),
        ({"n_steps": 2.0}, "'n_steps' must be an integer"),
        ({"weights": [0.5, 0.5, 0.0]}, "'weights' must be a float tensor"),
        ({"sq_grad_sum": torch.zeros(3)}, "K x N float32 or float64"),
        ({"sq_grad_sum": torch.zeros(3, 5, dtype=torch.float16)}, "K x N float32 or float64"),
        ({"weights": torch.ones(4)}, "'weights' must hold one number per source"),
        ({"warmup_sum": None}, "'warmup_sum' is missing"),
        ({"baseline": None}, "no baseline"),
        ({"sq_grad_sum": None}, "must be a fresh one"),
    ],
)
def test_load_state_dict_refuses_bad_states(change, match):
    agg = ExcessMTL()
    _run(agg, _calls(3, 5, 2, seed=0))
    state = {**agg.state_dict(), **change}
    with pytest.raises(ValueError, match=match):
        ExcessMTL().load_state_dict(state)


def test_a_refused_call_leaves_the_state_untouched():
    js = _calls(3, 40, 3, seed=5)
    agg = ExcessMTL()
    agg(js[0])
    before = agg.state_dict()
    bad = js[1].clone()
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite .* source\(s\) 1"):
        agg(bad)
    with pytest.raises(ValueError, match="out has"):
        agg(js[1], out=torch.empty(39, dtype=torch.float64))
    after = agg.state_dict()
    assert all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(before.values(), after.values())
    )
    assert torch.isnan(ExcessMTL(nonfinite="propagate")(bad)).all()


def test_sequences_of_rows_match_the_matrix():
    js = _calls(4, 300, 4, seed=6, dtype=torch.float32)
    a, b = ExcessMTL(), ExcessMTL()
    for j in js:
        torch.testing.assert_close(a(j), b([row.reshape(10, 30) for row in j]).reshape(-1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_backends_agree_and_keep_dtype_and_device(dtype):
    js = _calls(5, 3001, 3, seed=7, dtype=dtype)
    reference = excess_reference(js)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for backend in ("cpu", "torch", "triton"):
        agg = ExcessMTL(backend=backend)
        for j, expected in zip(js, reference, strict=True):
            out = torch.empty(3001, dtype=dtype)
            result, stats = agg(j, out=out, return_stats=True)
            assert result is out and out.dtype == dtype and out.device == j.device
            assert ((out.double() - expected).norm() / expected.norm()).item() < tol
            torch.testing.assert_close(stats.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
        expected_s = torch.float64 if dtype == torch.float64 else torch.float32
        assert agg.state_dict()["sq_grad_sum"].dtype == expected_s


def test_a_dtype_change_carries_the_state_over():
    js = _calls(3, 50, 4, seed=8)
    agg = ExcessMTL()
    _run(agg, [j.float() for j in js[:2]])
    assert agg.state_dict()["sq_grad_sum"].dtype == torch.float32
    agg(js[2])
    state = agg.state_dict()
    assert state["sq_grad_sum"].dtype == torch.float64 and state["n_steps"] == 3


def test_weighting_on_g_alone_returns_the_held_weights_without_a_step():
    agg = ExcessMTL()
    gram = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(agg.weighting(gram).weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    _, stats = agg(_calls(3, 20, 1, seed=2)[0], return_stats=True)
    assert torch.equal(agg.weighting(gram).weights, stats.weights)
    assert agg.state_dict()["n_steps"] == 1
    assert ExcessMTL().weighting(torch.ones(1, 1, dtype=torch.float64)).weights.tolist() == [1.0]


def test_repr_names_the_arguments():
    assert repr(ExcessMTL(0.5, 3)) == (
        "ExcessMTL(robust_step_size=0.5, n_warmup_steps=3, backend='auto', nonfinite='raise')"
    )
