"""Random weighting (Lin et al. 2022): a random convex combination per call, from its own generator."""

import pytest
import torch

from tolaria.aggregation import Random

from . import stateful_checks as checks
from .reference import assert_close_to_reference


def test_weights_are_a_softmax_of_normal_draws_from_its_generator():
    j = torch.randn(5, 30, dtype=torch.float64)
    _, stats = Random(seed=11)(j, return_stats=True)
    expected = torch.softmax(torch.randn(5, generator=torch.Generator().manual_seed(11), dtype=torch.float64), 0)
    torch.testing.assert_close(stats.weights, expected)
    assert_close_to_reference(Random(seed=11)(j), expected @ j, torch.float64)


def test_torchs_global_generator_is_untouched():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    aggregator = Random()
    j = torch.randn(4, 100)  # drawn before: the state to compare is after this
    before = torch.get_rng_state()
    for _ in range(3):
        aggregator(j)
    assert torch.equal(torch.get_rng_state(), before)


def test_state_dict_makes_the_draws_repeat():
    j = torch.randn(6, 40, dtype=torch.float64)
    checks.assert_loaded_state_repeats_draws(Random(seed=5), j)


def test_draws_change_from_call_to_call():
    j = torch.randn(3, 10, dtype=torch.float64)
    aggregator = Random(seed=1)
    assert not torch.equal(aggregator(j), aggregator(j))


def test_a_shared_generator_is_used_as_given():
    gen = torch.Generator().manual_seed(9)
    j = torch.randn(4, 10, dtype=torch.float64)
    _, stats = Random(generator=gen)(j, return_stats=True)
    expected = torch.softmax(torch.randn(4, generator=torch.Generator().manual_seed(9), dtype=torch.float64), 0)
    torch.testing.assert_close(stats.weights, expected)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"seed": 1, "generator": torch.Generator()}, ValueError),
        ({"seed": 1.5}, TypeError),
        ({"generator": 3}, TypeError),
    ],
)
def test_bad_arguments_are_refused(kwargs, error):
    with pytest.raises(error):
        Random(**kwargs)


def test_load_state_dict_refuses_other_shapes():
    with pytest.raises(ValueError, match="state_dict"):
        Random(seed=1).load_state_dict({"weights": torch.ones(3)})
