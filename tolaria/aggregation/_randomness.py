"""The own random generator of a randomised aggregator (Random, GradVac, GradDrop).

Each draws from a CPU ``torch.Generator`` of its own, seeded by ``seed`` or by the operating system,
or from one the caller shares; never from torch's global generator, so that adding an aggregator to
a program changes no other random draw.
"""

from __future__ import annotations

import torch

__all__ = ["own_generator"]


def own_generator(seed: int | None, generator: torch.Generator | None, owner: str) -> torch.Generator:
    """The generator ``owner`` draws from: ``generator`` if given, else a new one seeded by ``seed``
    (or by the operating system). Raises naming ``owner`` for both, or for a wrong type."""
    if generator is not None and seed is not None:
        raise ValueError(f"{owner} takes a seed or a generator, not both")
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        raise TypeError(f"{owner}'s generator must be a CPU torch.Generator, got {generator!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{owner}'s seed must be an integer, got {seed!r}")
    if generator is not None:
        return generator
    own = torch.Generator()
    if seed is None:
        own.seed()  # from the operating system; torch's global generator is untouched
    else:
        own.manual_seed(seed)
    return own
