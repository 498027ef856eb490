"""Every stateful aggregator of the registry keeps the state protocol the trainer relies on."""

import io

import pytest
import torch

from tolaria.aggregation import AGGREGATOR_NAMES, build_aggregator

_KWARGS = {
    "weighted": {"weights": [1.0, 2.0, 0.5]},
    "constant": {"weights": [1.0, 2.0, 0.5]},
    "random": {"seed": 1},
    "gradvac": {"seed": 1},
    "graddrop": {"seed": 1},
}
STATEFUL = [n for n in AGGREGATOR_NAMES if build_aggregator(n, **_KWARGS.get(n, {})).stateful]


def _inputs(calls: int, k: int = 3, n: int = 40):
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(calls):
        j = torch.randn(k, n, generator=gen, dtype=torch.float64)
        j[1] = -0.6 * j[0] + 0.4 * j[1]  # a conflict, so that every method has something to do
        out.append(j)
    return out


def _equal_states(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_states(a[x], b[x]) for x in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    return a == b


def test_the_stateful_ones_are_the_ones_expected():
    assert set(STATEFUL) >= {
        "pcgrad",
        "random",
        "gradvac",
        "graddrop",
        "pcd",
        "cr_mogm",
        "modo",
        "sdmgrad",
        "nash_mtl",
        "excess_mtl",
    }


@pytest.mark.parametrize("name", STATEFUL)
def test_a_saved_state_resumes_bit_for_bit_through_a_weights_only_load(name):
    first, second = _inputs(5)[:3], _inputs(5)[3:]
    original = build_aggregator(name, **_KWARGS.get(name, {}))
    for j in first:
        original(j)
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)
    expected = [original(j) for j in second]
    saved.seek(0)
    resumed = build_aggregator(name, **_KWARGS.get(name, {}))
    if build_aggregator(name).takes_generator():
        resumed = build_aggregator(name, seed=999)  # another seed: only the loaded state can make it repeat
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for j, e in zip(second, expected):
        assert torch.equal(resumed(j), e)


@pytest.mark.parametrize("name", [n for n in STATEFUL if n not in ("random",)])
def test_a_non_finite_step_leaves_the_state_as_it_was(name):
    # The trainer aggregates with nonfinite="propagate" and stats, then skips the step: the state
    # must not carry the NaN into the steps after it.
    aggregator = build_aggregator(name, nonfinite="propagate", **_KWARGS.get(name, {}))
    j = _inputs(2)
    aggregator(j[0], return_stats=True)
    before = aggregator.state_dict()
    bad = j[1].clone()
    bad[0, 3] = float("nan")
    aggregator(bad, return_stats=True)
    after = aggregator.state_dict()
    if aggregator.takes_generator():  # the generator moved on (it drew this call's randomness)
        before.pop("generator"), after.pop("generator")
    if name == "nash_mtl":  # its call counter (update_weights_every's clock) counts every call
        before.pop("step"), after.pop("step")
    assert _equal_states(before, after)


@pytest.mark.parametrize("name", STATEFUL)
def test_reset_returns_to_the_first_calls_behaviour(name):
    if build_aggregator(name).takes_generator():
        pytest.skip("randomised: reset keeps the generator going (reseed it to repeat)")
    aggregator = build_aggregator(name, **_KWARGS.get(name, {}))
    j = _inputs(3)
    first = aggregator(j[0])
    aggregator(j[1])
    aggregator.reset()
    assert torch.equal(aggregator(j[0]), first)
