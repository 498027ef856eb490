"""GradDrop (Chen et al. 2020): every backend and dtype against a float64 reference from the paper fed
the same uniforms, TorchJD with the same uniforms, its own generator, out=, stats, nonfinite, arguments."""

import pytest
import torch

from tolaria.aggregation.graddrop import GradDrop, draw_keys, graddrop_uniforms

from . import stateful_checks as checks

BACKENDS = ("cpu", "torch", "triton")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def paper_reference(j, u, leak=None, f=lambda p: p):
    g = j.to(torch.float64).reshape(j.shape[0], -1)
    p = 0.5 * (1 + g.sum(0) / g.abs().sum(0))
    fp = f(p)
    lk = torch.zeros(g.shape[0], dtype=torch.float64) if leak is None else torch.as_tensor(leak, dtype=torch.float64)
    out = torch.zeros(g.shape[1], dtype=torch.float64)
    for i in range(g.shape[0]):
        m = ((fp > u) & (g[i] > 0)) | ((fp < u) & (g[i] < 0))
        out += (lk[i] + (1 - lk[i]) * m.to(torch.float64)) * g[i]
    return out.reshape(j.shape[1:])


def _uniforms_of(seed, n):
    return graddrop_uniforms(draw_keys(torch.Generator().manual_seed(seed)), 0, n, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_and_dtype_matches_the_paper(backend, dtype):
    j = torch.randn(6, 50, 7).to(dtype)
    out = GradDrop(seed=3, backend=backend)(j)
    assert out.shape == (50, 7) and out.dtype == dtype
    ref = paper_reference(j, _uniforms_of(3, 350))
    scale = j.double().abs().sum(0).max()
    assert (out.double() - ref).abs().max() <= RTOL[dtype] * scale


def test_backends_agree_bit_for_bit_for_one_generator_state():
    j = torch.randn(5, 1000)
    results = [GradDrop(seed=8, backend=b)(j) for b in BACKENDS + ("auto",)]
    assert all(torch.equal(r, results[0]) for r in results)


def test_inputs_as_matrix_list_and_shaped_tensor_agree():
    j = torch.randn(4, 6, 5, dtype=torch.float64)
    a = GradDrop(seed=1)(j)
    assert torch.equal(GradDrop(seed=1)(list(j)), a)
    assert torch.equal(GradDrop(seed=1)(j.reshape(4, 30)), a.reshape(30))


def test_agrees_with_torchjd_fed_the_same_uniforms(monkeypatch):
    tjd = pytest.importorskip("torchjd.aggregation")
    j = torch.randn(5, 400, dtype=torch.float64)
    leak = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    for kwargs in ({}, {"leak": leak}, {"f": torch.sigmoid}):
        u = _uniforms_of(4, 400)
        ours = GradDrop(seed=4, backend="torch" if "f" in kwargs else "auto", **kwargs)(j)
        with monkeypatch.context() as m:
            m.setattr(torch, "rand", lambda *a, u=u, **k: u.clone())
            theirs = tjd.GradDrop(**kwargs)(j)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_a_callable_f_runs_on_torch_and_is_refused_elsewhere():
    j = torch.randn(4, 100, dtype=torch.float64)
    out = GradDrop(f=torch.sqrt, seed=2, backend="torch")(j)
    torch.testing.assert_close(out, paper_reference(j, _uniforms_of(2, 100), f=torch.sqrt))
    for backend in ("auto", "cpu", "triton"):
        with pytest.raises(ValueError, match="only the torch backend"):
            GradDrop(f=torch.sqrt, backend=backend)


def test_torchs_global_generator_is_untouched():
    j = torch.randn(4, 100)
    before = torch.get_rng_state()
    aggregator = GradDrop()
    for backend in BACKENDS:
        aggregator.backend = backend
        aggregator(j)
    assert torch.equal(torch.get_rng_state(), before)


def test_state_dict_and_shared_generator_repeat_the_draws():
    j = torch.randn(6, 400, dtype=torch.float64)
    checks.assert_loaded_state_repeats_draws(GradDrop(seed=5), j)
    assert GradDrop.stateful and GradDrop(seed=1).state_dict().keys() == {"generator"}
    assert torch.equal(GradDrop(generator=torch.Generator().manual_seed(5))(j), GradDrop(seed=5)(j))
    with pytest.raises(ValueError, match="state_dict"):
        GradDrop(seed=5).load_state_dict({})


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_and_stats(backend):
    j = torch.randn(3, 40, dtype=torch.bfloat16)
    buf = torch.empty(40, dtype=torch.bfloat16)
    result, stats = GradDrop(seed=0, backend=backend)(j, out=buf, return_stats=True)
    assert result.data_ptr() == buf.data_ptr()
    assert torch.equal(buf, GradDrop(seed=0, backend=backend)(j))
    assert torch.isnan(stats.weights).all() and stats.weights.shape == (3,) and int(stats.conflicts) == 0
    g = j.double()
    torch.testing.assert_close(stats.gram, g @ g.T, rtol=1e-5, atol=1e-5)  # Triton: float32 sums


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_raise_names_the_sources_and_propagate_lets_them_through(backend):
    j = torch.randn(4, 30)
    j[1, 3] = float("nan")
    j[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"source\(s\) 1, 3"):
        GradDrop(seed=0, backend=backend)(j)
    out = GradDrop(seed=0, backend=backend, nonfinite="propagate")(j)
    assert not torch.isfinite(out[3]) and not torch.isfinite(out[0])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"seed": 1, "generator": torch.Generator()}, ValueError, "seed or a generator"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"generator": 3}, TypeError, "generator"),
        ({"f": 3}, TypeError, "f must be callable"),
        ({"leak": [0.5, 2.0]}, ValueError, r"leak values must lie in \[0, 1\]"),
        ({"leak": [[0.5]]}, ValueError, "leak must be 1-D"),
        ({"leak": "x"}, TypeError, "leak"),
        ({"backend": "gpu"}, ValueError, "backend"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradDrop(**kwargs)


def test_leak_of_the_wrong_length_and_the_gram_weighting_are_refused():
    with pytest.raises(ValueError, match="2 leak values but got 3"):
        GradDrop(leak=[0.1, 0.2])(torch.randn(3, 5))
    with pytest.raises(TypeError, match="not a function of the Gram matrix"):
        GradDrop().weighting(torch.eye(3))


def test_every_cpu_isa_level_gives_the_torch_backends_bits():
    from tolaria.aggregation import cpu_isa, set_cpu_isa, supported_cpu_isas

    j = torch.randn(9, 1037)
    expected = GradDrop(seed=6, backend="torch")(j)
    before = cpu_isa()
    try:
        for level in supported_cpu_isas():
            set_cpu_isa(level)
            for dtype in (torch.float32, torch.float16):
                ours = GradDrop(seed=6, backend="cpu")(j.to(dtype))
                assert torch.equal(ours, GradDrop(seed=6, backend="torch")(j.to(dtype))), (level, dtype)
            assert torch.equal(GradDrop(seed=6, backend="cpu")(j), expected), level
    finally:
        set_cpu_isa(before)
