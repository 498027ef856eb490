"""How the tests build any registered aggregator: the arguments a name needs (weights, a seed for the
randomised ones, a trim count), so that registry-wide tests cover an aggregator added with one
registry line without a table of their own."""

from __future__ import annotations

from tolaria.aggregation import Aggregator, aggregator_class, build_aggregator

__all__ = ["example_aggregator"]


def example_aggregator(name: str, k: int, **overrides) -> Aggregator:
    """The aggregator ``name`` for K = ``k`` sources, seeded where it draws random numbers."""
    kwargs = {}
    if name in ("weighted", "constant"):
        kwargs["weights"] = [1.0 + i / k for i in range(k)]
    if aggregator_class(name).takes_generator():
        kwargs["seed"] = k
    if name == "trimmed_mean":
        kwargs["trim_number"] = (k - 1) // 2
    return build_aggregator(name, **{**kwargs, **overrides})
