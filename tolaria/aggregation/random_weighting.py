"""Random weighting (Lin et al. 2022, "Reasonable Effectiveness of Random Weighting: A Litmus Test
for Multi-Task Learning", Algorithm 2): at every call, weights softmax(z) with z standard normal.

The draws come from the aggregator's own generator, never from torch's global one, so adding it
to a program changes no other random draw; its state is part of ``state_dict()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .weighted import _FixedWeighting, _weight_dtype

__all__ = ["Random"]


class Random(_FixedWeighting):
    """A random convex combination of the sources, drawn anew at every call.

    Args:
        seed: seeds the aggregator's own generator (default: a seed from the operating system).
        generator: a CPU ``torch.Generator`` to draw from instead (shared with the caller).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.
    """

    def __init__(
        self,
        seed: int | None = None,
        *,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        if generator is not None and seed is not None:
            raise ValueError("Random takes a seed or a generator, not both")
        if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
            raise TypeError(f"Random's generator must be a CPU torch.Generator, got {generator!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"Random's seed must be an integer, got {seed!r}")
        self.generator = generator if generator is not None else torch.Generator()
        if generator is None:
            if seed is None:
                self.generator.seed()  # from the operating system; torch's global generator is untouched
            else:
                self.generator.manual_seed(seed)

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
