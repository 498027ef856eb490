"""Every aggregator on the Triton backend against the torch path and against float64.

The Triton backend's part is the same for every aggregator (the Gram pass, then the combine pass
with the weights the aggregator's weighting chose): PCGrad (whose weighting is also a kernel), Mean,
Sum and Weighted are checked over every K and dtype against the torch path and float64; the other
aggregators, discovered from ``tolaria.aggregation`` so that one added later is covered too, are
checked on every dtype and K up to 17 for the Gram matrix their weighting received and the combine
of the weights it chose (their own K x K solvers are tested in tests/aggregation, and some take
seconds at K = 64 on a CPU). One that cannot be built from keyword defaults needs an entry in
FACTORIES.
"""

import inspect

import pytest
import torch
from kernel_cases import DEVICE, DTYPES, KS, RTOL, pcgrad_reference, randn
from torch import nn

import tolaria.aggregation as aggregation
import tolaria.kernels.pcgrad as pcgrad_kernel
from tolaria.aggregation import CoordinatewiseAggregator, GradientBuffer, Mean, PCGrad, Sum, Weighted, as_sources
from tolaria.aggregation.backends.triton import TritonBackend
from tolaria.aggregation.engine import select_backend
from tolaria.aggregation.pcgrad import draw_orders


def _weights(k: int) -> list[float]:
    return [0.5 + (i % 5) * 0.25 for i in range(k)]


# name -> (k, backend) -> aggregator. Seeded generators make both backends draw the same orders.
CORE = {
    "PCGrad": lambda k, b: PCGrad(generator=torch.Generator().manual_seed(k), backend=b, nonfinite="propagate"),
    "PCGrad-mean-weighted": lambda k, b: PCGrad(
        reduction="mean", weights=_weights(k), generator=torch.Generator().manual_seed(k), backend=b
    ),
    "Mean": lambda k, b: Mean(backend=b),
    "Sum": lambda k, b: Sum(backend=b),
    "Weighted": lambda k, b: Weighted(_weights(k), backend=b),
}
# Aggregators that need arguments to be built.
FACTORIES: dict = {"Constant": lambda k, b: aggregation.Constant(_weights(k), backend=b)}
# Aggregators that need more sources than the smallest cases have.
MIN_K = {"Krum": 3}


def _generic_factory(cls):
    def make(k, b):
        params = inspect.signature(cls).parameters
        kwargs = {"backend": b}
        if "generator" in params:
            kwargs["generator"] = torch.Generator().manual_seed(k)
        try:
            return cls(**kwargs)
        except TypeError as exc:
            pytest.fail(f"{cls.__name__} cannot be built from defaults ({exc}); add it to FACTORIES")

    return make


def _other_factories():
    """Every Gramian aggregator beyond the core ones (the coordinate-wise ones, GradDrop and
    TrimmedMean, have no weights: their kernels are tested in test_graddrop_kernel.py and
    test_trimmed_mean_kernel.py)."""
    core_classes = {PCGrad, Mean, Sum, Weighted}
    factories = dict(FACTORIES)
    for name in aggregation.__all__:
        obj = getattr(aggregation, name)
        if inspect.isclass(obj) and issubclass(obj, CoordinatewiseAggregator):
            continue
        aggregator_class = inspect.isclass(obj) and issubclass(obj, aggregation.Aggregator)
        if aggregator_class and not inspect.isabstract(obj) and obj not in core_classes and name not in factories:
            factories[name] = _generic_factory(obj)
    return factories


OTHERS = _other_factories()


def _scale(weights: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """max over columns of sum_k |w_k x_k|: the size of what the accumulator adds, whatever cancels."""
    return (weights.detach().cpu().double().abs() @ j.detach().cpu().double().abs()).max()


@pytest.mark.parametrize("name", sorted(CORE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", KS)
def test_matches_torch_path_and_float64(name, dtype, k):
    n = 101 + 2 * k  # odd, and not a multiple of any block size
    j = randn(k, n, dtype=dtype, seed=k)
    out, stats = CORE[name](k, "triton")(j, return_stats=True)
    ref_out, ref_stats = CORE[name](k, "torch")(j, return_stats=True)
    # The float64 path of the same aggregator, on the same (rounded) inputs.
    f64_out, f64_stats = CORE[name](k, "torch")(j.to(torch.float64), return_stats=True)

    assert out.dtype == dtype and out.shape == (n,) and out.device == j.device
    assert int(stats.conflicts) == int(ref_stats.conflicts) == int(f64_stats.conflicts)
    g_scale = f64_stats.gram.diagonal().abs().max()
    assert (stats.gram.cpu() - f64_stats.gram.cpu()).abs().max() <= 1e-5 * g_scale
    w_scale = f64_stats.weights.abs().max().clamp_min(1e-12)
    assert (stats.weights.cpu() - f64_stats.weights.cpu()).abs().max() <= 1e-4 * w_scale
    scale = _scale(f64_stats.weights, j)
    for got in (out, ref_out):  # both paths sit within one rounding of the float64 result
        err = (got.cpu().double() - f64_out.cpu()).abs().max()
        assert err <= RTOL[dtype] * scale, f"error {err:.3g} vs scale {scale:.3g}"


OTHER_CASES = [(k, torch.bfloat16) for k in (1, 2, 3, 8, 17)] + [(8, torch.float32), (8, torch.float16)]


@pytest.mark.parametrize(
    "name,k,dtype",
    [(name, k, dtype) for name in sorted(OTHERS) for k, dtype in OTHER_CASES if k >= MIN_K.get(name, 1)],
    ids=str,
)
def test_other_aggregators_get_the_gram_matrix_and_their_combine(name, k, dtype):
    n = 101 + 2 * k
    j = randn(k, n, dtype=dtype, seed=k)
    out, stats = OTHERS[name](k, "triton")(j, return_stats=True)
    j64 = j.cpu().double()
    g64 = j64 @ j64.T
    assert out.dtype == dtype and out.shape == (n,)
    assert (stats.gram.cpu() - g64).abs().max() <= 1e-5 * g64.diagonal().max()
    assert torch.isfinite(stats.weights).all()
    expected = stats.weights.cpu() @ j64
    err = (out.cpu().double() - expected).abs().max()
    assert err <= RTOL[dtype] * _scale(stats.weights, j), f"{name}: error {err:.3g}"


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_other_aggregators_match_the_torch_path(name):
    j = randn(3, 131, seed=3)
    out, stats = OTHERS[name](3, "triton")(j, return_stats=True)
    ref, ref_stats = OTHERS[name](3, "torch")(j, return_stats=True)
    w_scale = ref_stats.weights.abs().max().clamp_min(1e-12)
    assert (stats.weights.cpu() - ref_stats.weights.cpu()).abs().max() <= 1e-4 * w_scale
    assert (out.cpu().double() - ref.cpu().double()).abs().max() <= 1e-4 * _scale(ref_stats.weights, j)


@pytest.mark.parametrize("k", [2, 8])
def test_pcgrad_matches_the_literal_algorithm(k):
    j = randn(k, 77, seed=20 + k)
    out = PCGrad(generator=torch.Generator().manual_seed(5), backend="triton")(j)
    orders = draw_orders(k, shuffle=True, generator=torch.Generator().manual_seed(5), device=torch.device("cpu"))
    expected = pcgrad_reference(j, orders.tolist())
    assert (out.cpu().double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_pcgrad_weighting_runs_in_the_kernel(monkeypatch):
    calls = []
    original = pcgrad_kernel.pcgrad_weights

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pcgrad_kernel, "pcgrad_weights", counting)
    j = randn(4, 50)
    PCGrad(backend="triton")(j)
    assert calls == [1]
    PCGrad(backend="torch")(j)
    assert calls == [1]


def test_pcgrad_beyond_the_kernel_size_uses_the_device_loop():
    k = pcgrad_kernel.MAX_K + 2  # also two row blocks in the Gram kernel
    j = randn(k, 20, seed=1)
    out, stats = PCGrad(shuffle=False, backend="triton")(j, return_stats=True)
    ref, ref_stats = PCGrad(shuffle=False, backend="torch")(j.double(), return_stats=True)
    assert int(stats.conflicts) == int(ref_stats.conflicts)
    assert (out.cpu().double() - ref.cpu()).abs().max() <= 1e-4 * _scale(ref_stats.weights, j)


def test_separate_tensors_and_any_shape():
    grads = [randn(3, 5, 7, seed=s) for s in range(4)]
    out = PCGrad(shuffle=False, backend="triton")(grads)
    ref = PCGrad(shuffle=False, backend="torch")(grads)
    assert out.shape == (3, 5, 7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gradient_buffer_aggregates_into_the_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(DEVICE)
    x = torch.randn(11, 7, device=DEVICE)
    losses = [model(x)[:, i].pow(2).mean() for i in range(3)]
    buf = GradientBuffer(model, num_sources=3)
    buf.backward(losses)
    expected = PCGrad(shuffle=False, backend="torch")(buf.buffer.clone())
    buf.aggregate(PCGrad(shuffle=False, backend="triton"))
    torch.testing.assert_close(buf.output, expected, rtol=1e-5, atol=1e-6)
    first = next(model.parameters())
    assert first.grad.data_ptr() == buf.output.data_ptr()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
def test_nonfinite_sources_are_named():
    j = randn(3, 40)
    j[1, 3] = float("inf")
    with pytest.raises(ValueError, match="source\\(s\\) 1"):
        PCGrad(backend="triton")(j)
    out = PCGrad(backend="triton", nonfinite="propagate")(j)
    assert not torch.isfinite(out).all()


def test_fast_mode_matches_deterministic_mode():
    sources = as_sources(randn(6, 99, dtype=torch.bfloat16))
    fast = TritonBackend(deterministic=False).gram(sources)
    exact = TritonBackend().gram(sources)
    assert fast.dtype == torch.float64
    assert (fast - exact).abs().max() <= 1e-6 * exact.diagonal().max()


def test_backend_selection():
    sources = as_sources(randn(2, 10))
    assert select_backend("triton", sources) is TritonBackend.instance()
    if DEVICE.type == "cpu":
        assert not isinstance(select_backend("auto", sources), TritonBackend)
    meta = as_sources(torch.empty(2, 10, device="meta"))
    reason = TritonBackend.instance().supports(meta)
    assert reason is not None and "meta" in reason
    with pytest.raises(ValueError, match="backend 'triton' cannot run"):
        select_backend("triton", meta)
