"""GradDrop (Chen et al. 2020, "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient
Sign Dropout", Algorithm 1 lines 10-15): per coordinate, keep the sources of one sign only, the sign
drawn with the probability of its purity.

Per coordinate, P = (1 + sum_i g_i / sum_i |g_i|) / 2 (the positive sign purity) and U uniform in
[0, 1); source i's entry is kept when g_i > 0 and f(P) > U, or g_i < 0 and f(P) < U; the result is
sum_i (leak_i + (1 - leak_i) M_i) g_i, computed as sum_i (kept ? 1 : leak_i) g_i (the same up to
rounding). A coordinate that is zero in every source gives 0.

Not a function of the Gram matrix: one coordinate-wise pass over J
(:mod:`tolaria.aggregation.backends.coordinatewise`). U is not stored: each call draws two 31-bit
keys from the aggregator's own generator, and every backend hashes (keys, coordinate) into U with
the same function (:func:`graddrop_uniforms`), so the same generator state drops the same entries on
every backend. With f = identity (the default) the comparison P > U is made as s > (2U - 1) a
(s, a: the two sums), with no division.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._coordinatewise import CoordinatewiseAggregator
from ._randomness import own_generator
from ._sources import Sources
from .backends import Backend
from .backends.coordinatewise import graddrop, graddrop_uniforms

__all__ = ["GradDrop", "graddrop_uniforms"]


def _leak_tensor(leak: Tensor | Sequence[float] | None) -> Tensor | None:
    if leak is None:
        return None
    try:
        values = torch.as_tensor(leak).detach().to(device="cpu", dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"GradDrop leak must be a 1-D tensor or sequence of K numbers, got {leak!r}") from exc
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"GradDrop leak must be 1-D with one value per source, got shape {tuple(values.shape)}")
    if not bool(((values >= 0) & (values <= 1)).all()):
        raise ValueError(f"GradDrop leak values must lie in [0, 1], got {values.tolist()}")
    return values


class GradDrop(CoordinatewiseAggregator):
    """Gradient sign dropout: per coordinate, the sources of one sign, drawn by its purity.

    Args:
        f: applied to P before the comparison with U (monotonically increasing; TorchJD's argument).
            ``None`` (default) is the identity, which every backend runs. Any other callable runs on
            the torch backend only, with P as one N-tensor: construct with ``backend="torch"`` (other
            backends are refused here, by name, rather than switched silently).
        leak: K values in [0, 1] (a tensor or a sequence): how much of a dropped entry passes through,
            per source (TorchJD's argument); ``None`` (default) is no leak.
        seed: seeds the aggregator's own generator (default: a seed from the operating system).
        generator: a CPU ``torch.Generator`` to draw from instead (shared with the caller).
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    Each call draws two integers from the generator, never from torch's global one, whatever the
    backend; its state is ``state_dict()``. Stats: see :mod:`tolaria.aggregation._coordinatewise`
    (``weights`` are NaN: each coordinate keeps its own subset of sources).
    """

    # Random per call.
    promises = frozenset()

    def __init__(
        self,
        f: Callable[[Tensor], Tensor] | None = None,
        leak: Tensor | Sequence[float] | None = None,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        if f is not None and not callable(f):
            raise TypeError(f"GradDrop f must be callable or None, got {f!r}")
        if f is not None and self.backend != "torch":
            raise ValueError(
                f"GradDrop f={f!r} is a Python callable, which only the torch backend can run (the compiled and "
                f"Triton kernels apply the identity); pass backend='torch', or f=None for backend={self.backend!r}"
            )
        self.f = f
        self.leak = _leak_tensor(leak)
        self.generator = own_generator(seed, generator, "GradDrop")

    stateful = True

    def _check_k(self, k: int) -> None:
        if self.leak is not None and self.leak.numel() != k:
            raise ValueError(f"GradDrop has {self.leak.numel()} leak values but got {k} gradient sources")

    def draw_keys(self) -> tuple[int, int]:
        """The next call's two hash keys, drawn from the generator (what every call does first)."""
        return draw_keys(self.generator)

    def _run(self, impl: Backend, sources: Sources, out: Tensor | None, check: bool) -> tuple[Tensor, bool | None]:
        return graddrop(impl, sources, self.draw_keys(), leak=self.leak, out=out, f=self.f, check=check)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state: loading it makes the next draws repeat."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("generator"), Tensor):
            raise ValueError("GradDrop.load_state_dict needs the dict state_dict() returned ({'generator': ...})")
        self.generator.set_state(state["generator"])

    def reset(self) -> None:
        """Nothing to forget: the draws go on from the generator's current state (reseed it to repeat)."""

    def __repr__(self) -> str:
        leak = None if self.leak is None else self.leak.tolist()
        return f"GradDrop(f={self.f!r}, leak={leak}, backend={self.backend!r}, nonfinite={self.nonfinite!r})"


def draw_keys(generator: torch.Generator) -> tuple[int, int]:
    """Two integers in [0, 2^31) from ``generator``: one GradDrop call's hash keys."""
    k0, k1 = torch.randint(0, 2**31, (2,), generator=generator, dtype=torch.int64).tolist()
    return int(k0), int(k1)
