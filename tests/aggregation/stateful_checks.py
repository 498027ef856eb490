"""What the tests of the stateful weightings (MoDo, SDMGrad, CR-MOGM) share: a plain simplex projection
for their references, a stream of Jacobians, and the checks of the state protocol (state_dict round
trip bit for bit, also through torch.save / torch.load(weights_only=True), reset, a change of K).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from tolaria.aggregation import Aggregator


def project_onto_simplex_reference(y: Tensor) -> Tensor:
    """argmin_{w >= 0, sum w = 1} |w - y|^2 = max(y - theta, 0), with theta found by bisection on
    sum_i max(y_i - theta, 0) = 1 (decreasing in theta), in Python floats: no sort, no cumsum."""
    values = [float(v) for v in y]
    low, high = min(values) - 1.0, max(values)  # the sum is >= 1 at low, 0 at high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if sum(max(v - mid, 0.0) for v in values) > 1.0:
            low = mid
        else:
            high = mid
    theta = 0.5 * (low + high)
    return torch.tensor([max(v - theta, 0.0) for v in values], dtype=torch.float64)


def jacobians(k: int, n: int, count: int, seed: int, scale: float = 1.0) -> list[Tensor]:
    """``count`` K x N float64 Jacobians of one stream (as the steps of a run), some rows conflicting."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        j = torch.randn(k, n, generator=gen, dtype=torch.float64) * scale
        if k > 1:
            j[1] = -0.6 * j[0] + 0.4 * j[1]
        out.append(j)
    return out


def run(aggregator: Aggregator, js: list[Tensor]) -> list[Tensor]:
    return [aggregator(j) for j in js]


def assert_bitwise(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"step {step} differs by {(x - y).abs().max().item():.3g}"


def assert_state_round_trip(make: Callable[[], Aggregator], js: list[Tensor], tmp_path) -> None:
    """The state after a few calls, loaded into a fresh aggregator (directly, and through a file read
    with weights_only=True), and back into the one that went on, makes the next calls repeat bit for bit."""
    half = len(js) // 2
    saved = make()
    run(saved, js[:half])
    state = saved.state_dict()
    path = tmp_path / "aggregator_state.pt"
    torch.save(state, path)
    expected = run(saved, js[half:])
    assert not all(torch.equal(a, b) for a, b in zip(expected, run(make(), js[half:]))), "the state had no effect"

    fresh = make()
    fresh.load_state_dict(state)
    assert_bitwise(run(fresh, js[half:]), expected)

    from_file = make()
    from_file.load_state_dict(torch.load(path, weights_only=True))
    assert_bitwise(run(from_file, js[half:]), expected)

    saved.load_state_dict(torch.load(path, weights_only=True))  # back in time, on the object that went on
    assert_bitwise(run(saved, js[half:]), expected)


def assert_state_is_a_copy(make: Callable[[], Aggregator], js: list[Tensor]) -> None:
    """Changing the returned state dict, or the one loaded, afterwards reaches into no aggregator."""
    agg = make()
    run(agg, js[:2])
    state = agg.state_dict()
    expected = run(make_loaded(make, state), js[2:])
    loaded = make_loaded(make, state)
    tensors = _tensors(state)
    assert tensors, "the state holds no tensor"
    for value in tensors:
        assert value.device.type == "cpu"
        value.add_(1)  # an integer step: generator states are uint8
    assert_bitwise(run(agg, js[2:]), expected)
    assert_bitwise(run(loaded, js[2:]), expected)


def make_loaded(make: Callable[[], Aggregator], state: dict) -> Aggregator:
    agg = make()
    agg.load_state_dict(state)
    return agg


def _tensors(state) -> list[Tensor]:
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    return []


def assert_reset_starts_over(make: Callable[[], Aggregator], js: list[Tensor]) -> None:
    agg = make()
    first = run(agg, js)
    again = run(agg, js)
    assert not all(torch.equal(a, b) for a, b in zip(first, again)), "the state had no effect"
    agg.reset()
    assert_bitwise(run(agg, js), first)


def assert_k_change_warns_and_starts_over(make: Callable[[], Aggregator], owner: str, k: int, n: int) -> None:
    agg = make()
    run(agg, jacobians(k, n, 3, seed=1))
    other = jacobians(k + 1, n, 2, seed=2)
    with pytest.warns(UserWarning, match=f"{owner}: the number of gradient sources changed from {k} to {k + 1}"):
        first = agg(other[0])
    rest = run(agg, other[1:])
    assert_bitwise([first, *rest], run(make(), other))


def assert_backends_agree(make: Callable[[str], Aggregator], js: list[Tensor], rtol: float = 1e-10) -> None:
    """The compiled CPU, plain PyTorch and Triton (interpreted without a GPU) backends over a few calls."""
    results = {b: run(make(b), js) for b in ("cpu", "torch", "triton")}
    for b in ("torch", "triton"):
        for step, (x, y) in enumerate(zip(results["cpu"], results[b])):
            gap = (x - y).abs().max().item()
            assert gap <= rtol * x.abs().max().item(), f"backend {b} step {step}: off by {gap:.3g}"


def assert_float32_kept(make: Callable[[], Aggregator], js: list[Tensor]) -> None:
    wide = run(make(), js)
    narrow = run(make(), [j.to(torch.float32) for j in js])
    for x, y in zip(wide, narrow):
        assert y.dtype == torch.float32 and y.device == js[0].device and y.shape == x.shape
        assert (y.to(torch.float64) - x).abs().max() <= 1e-4 * x.abs().max()


def assert_loaded_state_repeats_draws(aggregator: Aggregator, j: Tensor, calls: int = 3) -> None:
    """For an aggregator whose only state is its generator: after one call, the saved state, loaded back,
    makes the next calls repeat bit for bit (and the draws do change from call to call)."""
    aggregator(j)
    state = aggregator.state_dict()
    first = [aggregator(j) for _ in range(calls)]
    assert not torch.equal(first[0], first[1]), "the draws did not change between calls"
    aggregator.load_state_dict(state)
    assert_bitwise([aggregator(j) for _ in range(calls)], first)
