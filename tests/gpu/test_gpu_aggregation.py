"""The Triton path on a CUDA GPU: it matches the torch path, it records into a CUDA graph (so no step
synchronises the host), and its deterministic mode is bitwise reproducible.

Skipped without CUDA (tests/conftest.py); ``benchmarks/gpu_check.sh`` runs it on the GPU machine.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import tolaria.aggregation as aggregation
from tolaria.aggregation import Mean, PCGrad, Sum, Weighted
from tolaria.aggregation._sources import as_sources
from tolaria.aggregation.backends.triton import TritonBackend
from tolaria.kernels.combine import combine
from tolaria.kernels.gram import gram

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Distance from the float64 result, relative to max_c sum_k |w_k x_kc|: float32 accumulation
# (tf32x3 products for float32 rows) and one rounding of the output to its dtype.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=CUDA, dtype=torch.float32).to(dtype)


def _cuda_gen(seed: int) -> torch.Generator:
    return torch.Generator(device=CUDA).manual_seed(seed)


def _weights(k: int) -> list[float]:
    return [0.5 + (i % 5) * 0.25 for i in range(k)]


CORE = {
    "PCGrad": lambda k, b: PCGrad(generator=_cuda_gen(k), backend=b, nonfinite="propagate"),
    "PCGrad-mean-weighted": lambda k, b: PCGrad(
        reduction="mean", weights=_weights(k), generator=_cuda_gen(k), backend=b
    ),
    "Mean": lambda k, b: Mean(backend=b),
    "Sum": lambda k, b: Sum(backend=b),
    "Weighted": lambda k, b: Weighted(_weights(k), backend=b),
}


def _other_factories():
    """Every other aggregator in tolaria.aggregation, built from keyword defaults."""
    factories = {}
    for name in aggregation.__all__:
        cls = getattr(aggregation, name)
        if (
            inspect.isclass(cls)
            and issubclass(cls, aggregation.Aggregator)
            and not inspect.isabstract(cls)
            and cls not in (PCGrad, Mean, Sum, Weighted)
        ):
            takes_generator = "generator" in inspect.signature(cls).parameters

            def make(k, b, cls=cls, takes_generator=takes_generator):
                return cls(backend=b, **({"generator": _cuda_gen(k)} if takes_generator else {}))

            factories[name] = make
    return factories


OTHERS = _other_factories()


def _scale(weights: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    return (weights.double().abs() @ j.double().abs()).max()


def _check_against_torch(factory, k, dtype, n=100_003):
    j = _randn(k, n, dtype=dtype, seed=k)
    out, stats = factory(k, "auto")(j, return_stats=True)  # auto picks Triton for CUDA tensors
    ref, ref_stats = factory(k, "torch")(j, return_stats=True)
    f64, f64_stats = factory(k, "torch")(j.double(), return_stats=True)
    assert out.dtype == dtype and out.device == j.device
    assert int(stats.conflicts) == int(ref_stats.conflicts) == int(f64_stats.conflicts)
    assert (stats.gram - f64_stats.gram).abs().max() <= 1e-5 * f64_stats.gram.diagonal().max()
    scale = _scale(f64_stats.weights, j)
    for got in (out, ref):
        err = (got.double() - f64).abs().max()
        assert err <= RTOL[dtype] * scale, f"error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("name", sorted(CORE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 8, 17, 64])
def test_matches_the_torch_path(name, dtype, k):
    _check_against_torch(CORE[name], k, dtype)


@pytest.mark.parametrize("name", sorted(OTHERS))
@pytest.mark.parametrize("k", [3, 8])
def test_other_aggregators_match_the_torch_path(name, k):
    # Their K x K solvers are tested in tests/aggregation; here, the Triton passes around them.
    _check_against_torch(OTHERS[name], k, torch.bfloat16)


def test_headline_size():
    j = _randn(8, 10_000_019, dtype=torch.bfloat16, seed=1)
    out, stats = PCGrad(shuffle=False)(j, return_stats=True)
    ref, ref_stats = PCGrad(shuffle=False, backend="torch")(j, return_stats=True)
    assert int(stats.conflicts) == int(ref_stats.conflicts)
    assert (out.double() - ref.double()).abs().max() <= 2 * RTOL[torch.bfloat16] * _scale(ref_stats.weights, j)


def test_offsets_beyond_2_to_the_31():
    n = 2**30 + 5  # row 2 starts past 2^31 elements: offsets must be int64
    if torch.cuda.mem_get_info()[0] < 40 * 2**30:
        pytest.skip("needs 40 GiB of free GPU memory")
    j = _randn(3, n, dtype=torch.bfloat16, seed=2)
    g = gram(j)
    ref = torch.stack([torch.stack([torch.dot(a.float(), b.float()).double() for b in j]) for a in j])
    # ~2^21 float32 additions per program: loose bound; a wrong offset would be off by O(1).
    assert (g - ref).abs().max() <= 1e-3 * ref.diagonal().max()
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, device=CUDA)
    out = combine(j, w)
    expected = (0.5 * j[0].float() - j[1].float() + 2.0 * j[2].float()).to(torch.bfloat16)
    assert ((out.float() - expected.float()).abs() <= expected.float().abs() * 2**-7 + 1e-3).all()
    del j, out, expected


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_layouts(dtype):
    n = 100_003
    base = _randn(10, n + 40, dtype=dtype, seed=3)
    cases = {
        "separate tensors": [_randn(n, dtype=dtype, seed=s) for s in range(5)],
        "row stride > N (misaligned)": base[:, 3 : 3 + n],
        "every other row": base[::2, :n],
        "column stride 2": base[:, : 2 * (n // 2) : 2],
        "transposed storage": base[:, :n].t().contiguous().t(),
    }
    for label, grads in cases.items():
        out = PCGrad(shuffle=False)(grads)
        ref, ref_stats = PCGrad(shuffle=False, backend="torch")(
            [g.double() for g in grads] if isinstance(grads, list) else grads.double(), return_stats=True
        )
        j = torch.stack(grads) if isinstance(grads, list) else grads
        err = (out.double() - ref).abs().max()
        assert err <= RTOL[dtype] * _scale(ref_stats.weights, j), f"{label}: error {err:.3g}"


def _graph_step(agg, j, out):
    _, stats = agg(j, out=out, return_stats=True)
    return stats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "make",
    [
        lambda: PCGrad(shuffle=False, nonfinite="propagate"),
        lambda: PCGrad(reduction="mean", weights=_weights(8), shuffle=False, nonfinite="propagate"),
        lambda: Mean(nonfinite="propagate"),
        lambda: Sum(nonfinite="propagate"),
    ],
    ids=["pcgrad", "pcgrad-mean-weighted", "mean", "sum"],
)
def test_the_whole_step_records_into_a_cuda_graph(make, dtype):
    # Capture fails on any host synchronisation; replaying on new data must give the eager result.
    agg = make()
    j = _randn(8, 1_000_003, dtype=dtype, seed=4)
    out = torch.empty(j.shape[1], dtype=dtype, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: compiles the kernels, caches the device-side weights
            _graph_step(agg, j, out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = _graph_step(agg, j, out)
    for seed in (5, 6):
        j.copy_(_randn(8, j.shape[1], dtype=dtype, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        expected, expected_stats = agg(j, return_stats=True)
        assert torch.equal(out, expected)
        assert torch.equal(stats.weights, expected_stats.weights)
        assert int(stats.conflicts) == int(expected_stats.conflicts)


def test_shuffled_pcgrad_on_separate_tensors_records_into_a_cuda_graph():
    # Orders are drawn on the device each replay; the rows go through the cached row table.
    agg = PCGrad(nonfinite="propagate")
    rows = [_randn(300_007, dtype=torch.bfloat16, seed=s) for s in range(6)]
    out = torch.empty(300_007, dtype=torch.bfloat16, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            agg(rows, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, stats = agg(rows, out=out, return_stats=True)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, combine(rows, stats.weights))  # the replayed weights, applied
        assert 0 <= int(stats.conflicts) <= 6 * 5


def test_an_eager_step_never_synchronises():
    j = _randn(8, 1_000_003, dtype=torch.bfloat16, seed=7)
    rows = list(_randn(4, 1000, seed=8).clone().unbind(0))
    rows = [r.clone() for r in rows]  # separate allocations: the row-table path
    aggs = [PCGrad(nonfinite="propagate"), PCGrad(shuffle=False, nonfinite="propagate"), Mean(nonfinite="propagate")]
    for agg in aggs:  # warm-up (compilation may synchronise)
        agg(j)
        agg(rows)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for agg in aggs:
            agg(j, return_stats=True)
            agg(rows, return_stats=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_deterministic_mode_is_bitwise_reproducible(dtype):
    j = _randn(8, 10_000_019, dtype=dtype, seed=9)
    first = gram(j)
    for _ in range(4):
        assert torch.equal(gram(j), first)
    agg = PCGrad(shuffle=False)
    out = agg(j)
    for _ in range(3):
        assert torch.equal(agg(j), out)
    fast = gram(j, deterministic=False)
    assert (fast - first).abs().max() <= 1e-5 * first.diagonal().max()


def test_backend_instance_is_deterministic_and_cuda_only():
    backend = TritonBackend.instance()
    assert backend.deterministic
    assert backend.supports(as_sources(torch.ones(2, 3))) is not None  # CPU tensors: not compiled
