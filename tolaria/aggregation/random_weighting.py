"""Random weighting (Lin et al. 2022, "Reasonable Effectiveness of Random Weighting: A Litmus Test
for Multi-Task Learning", Algorithm 2): at every call, weights softmax(z) with z standard normal.

The draws come from the aggregator's own generator, never from torch's global one, so adding it
to a program changes no other random draw; its state is part of ``state_dict()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._randomness import own_generator
from .weighted import _FixedWeighting, _weight_dtype

__all__ = ["Random"]


class Random(_FixedWeighting):
    """A random convex combination of the sources, drawn anew at every call.

    Args:
        seed: seeds the aggregator's own generator (default: a seed from the operating system).
        generator: a CPU ``torch.Generator`` to draw from instead (shared with the caller).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.
    """

    # Random weights per call.
    promises = frozenset()

    def __init__(
        self,
        seed: int | None = None,
        *,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        self.generator = own_generator(seed, generator, "Random")

    stateful = True

    def _fixed_weights(self, k: int, device: torch.device) -> Tensor:
        z = torch.randn(k, generator=self.generator, dtype=torch.float64)
        return torch.softmax(z, dim=0).to(device=device, dtype=_weight_dtype(device))

    def state_dict(self) -> dict[str, Tensor]:
        """The generator's state: loading it makes the next draws repeat."""
        return {"generator": self.generator.get_state()}

    def reset(self) -> None:
        """Nothing to forget: the draws go on from the generator's current state (reseed it to repeat)."""

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("generator"), Tensor):
            raise ValueError("Random.load_state_dict needs the dict state_dict() returned ({'generator': ...})")
        self.generator.set_state(state["generator"])
