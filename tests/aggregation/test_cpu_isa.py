"""The compiled CPU backend at every ISA level this machine runs (avx512, avx2, baseline on x86-64;
neon, baseline on aarch64), on torch's own threads, and the TOLARIA_CPU_ISA switch.

Every level is forced in turn on one machine, so a wide CPU tests the narrow levels too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tolaria.aggregation import (
    AGGREGATOR_NAMES,
    CPU_ISA_ENV,
    PCGrad,
    as_sources,
    build_aggregator,
    cpu_isa,
    set_cpu_isa,
    supported_cpu_isas,
)
from tolaria.aggregation.backends import CompiledCpuBackend
from tolaria.aggregation.backends import cpu as cpu_backend

from .reference import ascending_orders, assert_close_to_reference, pcgrad_reference

LEVELS = supported_cpu_isas()
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BACKEND = CompiledCpuBackend()

pytestmark = pytest.mark.skipif(not LEVELS, reason="the compiled CPU extension did not load")


@pytest.fixture(params=LEVELS)
def level(request):
    before = cpu_isa()
    set_cpu_isa(request.param)
    yield request.param
    set_cpu_isa(before)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _matrix(k: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 3.0, k, dtype=torch.float64)[:, None]
    return (torch.randn(k, n, generator=gen, dtype=torch.float64) * scales).to(dtype)


def _assert_gram_close(g: torch.Tensor, j: torch.Tensor, dtype: torch.dtype) -> None:
    ref = j.to(torch.float64) @ j.to(torch.float64).T
    d = ref.diagonal().sqrt()
    scale = d[:, None] * d[None, :] + 1e-300
    # float32 lanes folded into double: a few float32 roundings of sqrt(G_ii G_jj) at most.
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    err = ((g - ref).abs() / scale).max().item()
    assert err <= tol, f"max |dG| / sqrt(G_ii G_jj) = {err:.3g} > {tol}"
    assert torch.equal(g, g.T)


# N: below one vector, around one vector of every level, past a chunk, past a lane-accumulation window,
# and large enough (with K) for both threads to get a range.
NS = [1, 3, 4, 7, 8, 15, 16, 17, 63, 65, 1001, 4099, 70001]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17])
def test_gram_matches_float64(level, threads, dtype, k):
    for n in NS:
        j = _matrix(k, n, dtype, seed=k * 7919 + n)
        _assert_gram_close(BACKEND.gram(as_sources(j)), j, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 16, 17])
def test_combine_matches_float64(level, threads, dtype, k):
    for n in NS:
        j = _matrix(k, n, dtype, seed=k + n)
        w = torch.linspace(-1.0, 2.0, k, dtype=torch.float64)
        out, finite = BACKEND.combine_checked(as_sources(j), w, None)
        assert finite and out.dtype == dtype and out.shape == (n,)
        assert_close_to_reference(out, (w[:, None] * j.to(torch.float64)).sum(0), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_combine_rounds_once(level, threads, dtype):
    # Weights whose terms cancel: the float64-accumulated sum, rounded once, is the exact sum to
    # half a unit in its last place, however much the terms cancel.
    k, n = 6, 70001
    j = _matrix(k, n, dtype, seed=9)
    w = torch.tensor([1e4, -1e4, 3.0, -2.5, 1e-3, 0.5], dtype=torch.float64)
    exact = w @ j.to(torch.float64)
    out, finite = BACKEND.combine_checked(as_sources(j), w, None, wide=True)
    assert finite and out.dtype == dtype
    half_ulp = {torch.float64: 2.0**-52, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
    subnormal = 2.0**-24 if dtype == torch.float16 else 0.0
    bound = 1.01 * half_ulp[dtype] * exact.abs() + subnormal + 1e-12 * (w.abs() @ j.to(torch.float64).abs())
    assert ((out.to(torch.float64) - exact).abs() <= bound).all()


@pytest.mark.parametrize("layout", ["strided rows", "separate tensors", "unaligned rows"])
def test_row_layouts(level, layout):
    base = _matrix(6, 5003, torch.float32, seed=1)
    if layout == "strided rows":
        j = base[:, 2:4001]
    elif layout == "separate tensors":
        j = [r.clone() for r in base[:, :4001]]
    else:
        j = [torch.cat([torch.zeros(1), r])[1:] for r in base[:, :4001]]  # 4 bytes past the allocation
    dense = torch.stack(list(j)) if isinstance(j, list) else j
    _assert_gram_close(BACKEND.gram(as_sources(j)), dense, torch.float32)
    w = torch.arange(6, dtype=torch.float64)
    assert_close_to_reference(BACKEND.combine(as_sources(j), w, None), w @ dense.to(torch.float64), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_rounding_is_bit_exact_with_torch(level, dtype):
    # One source times a weight: the float32 product, rounded to the output dtype exactly as torch
    # rounds it (nearest even), subnormals, overflow to inf and signed zeros included.
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny, info.tiny / 3, -info.tiny / 7, info.max, -info.max, 1.0, -1.5])
    values = torch.cat([special, torch.randn(4093) * 10.0 ** torch.randint(-6, 5, (4093,))]).to(dtype)
    for weight in [1.0, 0.5, 3.0, -1.0 / 3.0, 1e-4]:
        out = BACKEND.combine(as_sources(values[None, :]), torch.tensor([weight], dtype=torch.float64), None)
        expected = (values.float() * torch.tensor(weight, dtype=torch.float32)).to(dtype)
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), weight


def test_nonfinite_inputs_are_reported_and_huge_finite_ones_are_not(level):
    j = _matrix(5, 3001, torch.float32, seed=2)
    bad = j.clone()
    bad[3, 2999] = float("nan")
    assert not BACKEND.combine_checked(as_sources(bad), torch.ones(5, dtype=torch.float64), None)[1]
    assert not torch.isfinite(BACKEND.gram(as_sources(bad))[3, 3])
    huge = j * 1e30  # squares overflow float32: the Gram pass re-runs in double
    g = BACKEND.gram(as_sources(huge))
    assert torch.isfinite(g).all()
    _assert_gram_close(g, huge, torch.float32)


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_every_aggregator_matches_the_torch_backend(level, name, dtype):
    kwargs = {"weights": [1.0, 0.5, 2.0, 0.25, 1.5, 1.0, 0.75]} if name in ("weighted", "constant") else {}
    if name == "pcgrad":
        kwargs["shuffle"] = False
    if name in ("random", "gradvac", "graddrop"):
        kwargs["seed"] = 0  # the same draws on both sides
    j = _matrix(7, 3001, dtype, seed=11)
    j[1] = -0.8 * j[0] + 0.1 * j[1]  # a conflict to resolve
    compiled = build_aggregator(name, backend="cpu", **kwargs)(j)
    reference = build_aggregator(name, backend="torch", **kwargs)(j.to(torch.float64))
    assert_close_to_reference(compiled, reference, dtype)


def test_pcgrad_matches_the_per_pair_reference(level):
    j = _matrix(8, 20001, torch.float32, seed=5)
    j[::2] *= -1
    out = PCGrad(shuffle=False, backend="cpu")(j)
    assert_close_to_reference(out, pcgrad_reference(j, ascending_orders(8)), torch.float32)


# ---- threads ----------------------------------------------------------------------------------


def _tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc")
def test_passes_run_on_torchs_openmp_team_and_start_no_threads(threads):
    ext = cpu_backend._ext
    assert ext.openmp_runtime(), "no OpenMP runtime found: the passes would run on one thread"
    torch.ones(1 << 20).sum()  # torch's own team exists now
    before = _tasks()
    team = ext.team_thread_ids(torch.get_num_threads())
    assert len(team) == threads  # follows torch.set_num_threads
    assert set(team) <= before, "a pass ran on a thread torch did not start"
    j = _matrix(8, 1 << 18, torch.float32, seed=3)
    PCGrad(backend="cpu")(j)
    assert _tasks() == before


# ---- TOLARIA_CPU_ISA --------------------------------------------------------------------------


def _import_with(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, CPU_ISA_ENV: value}
    code = "import tolaria.aggregation as a; print(a.cpu_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value", LEVELS)
def test_environment_forces_a_level_at_import(value):
    done = _import_with(f" {value.upper()} ")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == value


@pytest.mark.parametrize("value", ["avx1024", "neon" if "neon" not in LEVELS else "avx512"])
def test_environment_rejects_unknown_or_unsupported_levels_at_import(value):
    done = _import_with(value)
    assert done.returncode != 0
    assert CPU_ISA_ENV in done.stderr and "ValueError" in done.stderr
    for valid in LEVELS:
        assert valid in done.stderr  # the message names what would work


def test_default_is_the_widest_supported_level():
    env = {k: v for k, v in os.environ.items() if k != CPU_ISA_ENV}
    code = "import tolaria.aggregation as a; print(a.cpu_isa())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == LEVELS[0]


def test_set_cpu_isa_rejects_bad_values():
    with pytest.raises(ValueError, match="valid levels are"):
        set_cpu_isa("sse9")
    with pytest.raises(TypeError):
        set_cpu_isa(2)
