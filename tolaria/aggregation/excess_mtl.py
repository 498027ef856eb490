"""ExcessMTL (He et al. 2024, "Robust Multi-Task Learning with Excess Risks", Algorithm 1).

Each source's excess risk is estimated by a second-order Taylor expansion around the optimum
(Equations 6 and 7): E_i ~ g_i^T H_i^-1 g_i, with H_i the AdaGrad-style diagonal
sqrt(sum over calls of g_i^2). The estimates are divided by a baseline, the first one observed
(Section 3.2, "scale processing"), and the weights take an exponentiated-gradient step on the
simplex (Equation 9): w <- softmax(log w + eta E). The weights start uniform.

Unlike every other aggregator here the weights are not a function of G = J J^T: they need the
elementwise squares of J. A call therefore runs one fused pass of its own over J before the engine,
S += J * J in place and E_i = sum_j J_ij^2 / sqrt(S_ij + 1e-7) (in float64 for float64 gradients,
float32 otherwise), and hands the weights to the engine, which combines w^T J on the chosen backend.

Semantics follow TorchJD 0.18 (after the paper's code and LibMTL): ``n_warmup_steps`` calls first
return uniform weights and accumulate E; the baseline is then their mean (Appendix C.1), or with no
warmup the first call's E, which that call also uses unscaled.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._gramian import conflicting_pairs
from ._sources import Sources, check_out
from ._stateful import check_count, check_state_keys
from .aggregator import Aggregator
from .backends.base import accumulation_dtype
from .engine import Weights, aggregate, has_float64, select_backend
from .stats import AggregationStats

__all__ = ["ExcessMTL"]

EPS = 1e-7  # in the AdaGrad diagonal and under the baseline, as the paper's code
# Elements of J squared at a time by the fused pass: its two temporaries stay this size whatever N is
# (a few MiB on the CPU; larger blocks on accelerators keep the kernel launches few).
_CHUNK_ELEMENTS_CPU = 1 << 20
_CHUNK_ELEMENTS = 1 << 24

_STATE_KEYS = ("weights", "sq_grad_sum", "baseline", "warmup_sum", "n_steps")


class ExcessMTL(Aggregator):
    """Exponentiated-gradient weights driven by each source's estimated excess risk.

    Args:
        robust_step_size: the step size eta of the exponentiated update, > 0 (TorchJD's argument).
        n_warmup_steps: calls, >= 0, that return uniform weights while their excess risks are
            averaged into the baseline (the paper recommends three epochs of them); 0 (default) takes
            the first call's excess risks as the baseline, as the official code does.
        backend, nonfinite: see :class:`~tolaria.aggregation.Aggregator`.

    Memory: the state holds S, K x N numbers (float32, float64 for float64 gradients) on the
    gradients' device, as large as the gradients themselves in float32: K = 8 sources of a 1e9-parameter
    model keep 32 GB. ``state_dict()`` copies it to the host, and checkpoints carry it.

    Passes over J: the fused pass (reading J and reading and writing S), then the combine. With
    ``nonfinite="raise"`` (the default) or ``return_stats=True`` the engine's Gram pass runs first,
    so that a call on non-finite gradients raises before the state is touched (with
    ``nonfinite="propagate"`` and stats, as the trainer calls it, such a call returns NaN and leaves
    the state alone); with ``nonfinite="propagate"`` and no stats, nothing is read on the host and
    non-finite values enter S and the weights for good, as in TorchJD: restore a saved state or
    :meth:`reset`. ``conflicts`` in the stats counts the pairs of sources
    with a negative inner product.

    Stateful: weights, S, baseline, warmup sum and call count are in :meth:`state_dict`. A call with
    another K or N starts the state over with a warning; one with another dtype or device carries it
    over (S converted to the new accumulation dtype). :meth:`weighting` on G alone returns the
    weights currently held, without a step (for K = 1: [1], the identity, which every call is).
    """

    promises = frozenset({"permutation"})

    stateful = True

    def __init__(
        self,
        robust_step_size: float = 1.0,
        n_warmup_steps: int = 0,
        *,
        backend: str = "auto",
        nonfinite: str = "raise",
    ):
        super().__init__(backend=backend, nonfinite=nonfinite)
        if (
            isinstance(robust_step_size, bool)
            or not isinstance(robust_step_size, (int, float))
            or not 0 < float(robust_step_size) < float("inf")
        ):
            raise ValueError(f"ExcessMTL robust_step_size must be a finite number > 0, got {robust_step_size!r}")
        if isinstance(n_warmup_steps, bool) or not isinstance(n_warmup_steps, int) or n_warmup_steps < 0:
            raise ValueError(f"ExcessMTL n_warmup_steps must be an integer >= 0, got {n_warmup_steps!r}")
        self.robust_step_size = float(robust_step_size)
        self.n_warmup_steps = n_warmup_steps
        self.reset()

    def reset(self) -> None:
        """Forgets everything: the next call starts from uniform weights, an empty S, and the warmup."""
        self._weights: Tensor | None = None
        self._sq_grad_sum: Tensor | None = None
        self._baseline: Tensor | None = None
        self._warmup_sum: Tensor | None = None
        self._n_steps = 0

    def _aggregate(
        self, sources: Sources, out: Tensor | None, with_stats: bool
    ) -> tuple[Tensor, AggregationStats | None]:
        return_stats = with_stats
        # Everything that can refuse the call does so before the state changes.
        select_backend(self.backend, sources)
        if out is not None:
            check_out(out, sources)
        if return_stats or self.nonfinite == "raise":
            # After the engine's Gram pass (and its finiteness check): a refused call leaves S as it was.
            def weighting(gram: Tensor) -> Weights:
                # With stats under "propagate" (the trainer's way: it skips such a step), a
                # non-finite G gives NaN weights and leaves the state alone: one host read of G.
                if self.nonfinite == "propagate" and not bool(torch.isfinite(gram).all()):
                    return Weights(torch.full_like(gram.diagonal(), torch.nan), conflicting_pairs(gram))
                return Weights(self._step(sources, gram.dtype), conflicting_pairs(gram))

            fixed = None
        else:
            weights = self._step(sources, torch.float64 if has_float64(sources.device) else torch.float32)

            def weighting(gram: Tensor) -> Weights:  # not called: the engine takes the fixed weights
                return Weights(weights, conflicting_pairs(gram))

            def fixed(k: int, device: torch.device) -> Tensor:
                return weights

        return aggregate(
            sources,
            weighting,
            backend=self.backend,
            nonfinite=self.nonfinite,
            out=out,
            with_stats=return_stats,
            fixed_weights=fixed,
            wide_combine=self.wide_combine,
        )

    def weighting(self, gram: Tensor) -> Weights:
        """The weights currently held (uniform before the first call), without a step: they need J."""
        k = gram.shape[-1]
        if self._weights is None or self._weights.shape[0] != k:
            weights = torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)
        else:
            weights = self._weights.to(device=gram.device, dtype=gram.dtype)
        return Weights(weights, conflicting_pairs(gram))

    # ---- one step ---------------------------------------------------------------------------------

    def _step(
        self, sources: Sources, dtype: torch.dtype, *, reduce_sum: Callable[[Tensor], None] | None = None
    ) -> Tensor:
        """Updates S with this call's J, then the weights; returns them (K, ``dtype``, J's device).
        On a column shard (``tolaria.aggregation.sharded``) S is the shard's and ``reduce_sum`` sums the
        partial excess risks over the ranks."""
        self._ensure_state(sources, dtype)
        excess = self._fused_pass(sources)
        if reduce_sum is not None:
            reduce_sum(excess)
        excess = excess.to(dtype)
        if self._n_steps < self.n_warmup_steps:
            self._warmup_sum.add_(excess)
            self._n_steps += 1
            return self._weights
        self._n_steps += 1
        if self._baseline is None:
            if self.n_warmup_steps > 0:
                self._baseline = self._warmup_sum / self.n_warmup_steps
                excess = excess / (self._baseline + EPS)
            else:  # the official code: the first call's excess risks are the baseline, used unscaled
                self._baseline = excess
        else:
            excess = excess / (self._baseline + EPS)
        # Equation 9 in log space: a huge excess risk saturates the weights instead of overflowing.
        self._weights = torch.softmax(self._weights.log() + self.robust_step_size * excess, dim=0)
        return self._weights

    def _fused_pass(self, sources: Sources) -> Tensor:
        """S += J * J in place and E_i = sum_j J_ij^2 / sqrt(S_ij + 1e-7), a block of columns at a time."""
        s = self._sq_grad_sum
        excess = torch.zeros(sources.k, dtype=s.dtype, device=sources.device)
        chunk = _CHUNK_ELEMENTS_CPU if sources.device.type == "cpu" else _CHUNK_ELEMENTS
        if sources.matrix is not None:  # all K rows of a column block at once
            blocks = [(sources.matrix, s, excess)]
            chunk = max(1, chunk // sources.k)
        else:  # separate rows, never stacked
            blocks = [(row[None], s[i : i + 1], excess[i : i + 1]) for i, row in enumerate(sources.rows)]
        for j, s_block, e_block in blocks:
            for start in range(0, sources.n, chunk):
                x = j[:, start : start + chunk]
                sq = x.square() if x.dtype == s.dtype else x.to(s.dtype).square_()  # never J in place
                s_chunk = s_block[:, start : start + chunk]
                s_chunk.add_(sq)
                e_block += sq.div_(s_chunk.add(EPS).sqrt_()).sum(1)
        return excess

    def _ensure_state(self, sources: Sources, dtype: torch.dtype) -> None:
        k, n, device = sources.k, sources.n, sources.device
        acc = accumulation_dtype(sources.dtype)
        if self._sq_grad_sum is not None and tuple(self._sq_grad_sum.shape) != (k, n):
            warnings.warn(
                f"ExcessMTL was given {k} sources of {n} elements after {self._sq_grad_sum.shape[0]} of "
                f"{self._sq_grad_sum.shape[1]}: its state starts over",
                stacklevel=4,
            )
            self.reset()
        if self._sq_grad_sum is None:
            self._sq_grad_sum = torch.zeros((k, n), dtype=acc, device=device)
            self._warmup_sum = torch.zeros(k, dtype=dtype, device=device)
            self._weights = torch.full((k,), 1.0 / k, dtype=dtype, device=device)
            self._baseline = None
            self._n_steps = 0
            return
        # A loaded state (on the host) or another dtype/device: carried over, converted.
        self._sq_grad_sum = self._sq_grad_sum.to(device=device, dtype=acc)
        self._warmup_sum = self._warmup_sum.to(device=device, dtype=dtype)
        self._weights = self._weights.to(device=device, dtype=dtype)
        if self._baseline is not None:
            self._baseline = self._baseline.to(device=device, dtype=dtype)

    # ---- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Weights, S (K x N), baseline, warmup sum (CPU copies, None before the first call) and call count."""

        def host(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to("cpu", copy=True)

        return {
            "weights": host(self._weights),
            "sq_grad_sum": host(self._sq_grad_sum),
            "baseline": host(self._baseline),
            "warmup_sum": host(self._warmup_sum),
            "n_steps": self._n_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = check_state_keys(state, "ExcessMTL", _STATE_KEYS)
        n_steps = check_count(state["n_steps"], "ExcessMTL", "n_steps")
        tensors = {key: state[key] for key in ("weights", "sq_grad_sum", "baseline", "warmup_sum")}
        for key, value in tensors.items():
            if value is not None and (not isinstance(value, Tensor) or not value.is_floating_point()):
                raise ValueError(f"ExcessMTL state {key!r} must be a float tensor or None, got {type(value).__name__}")
        s = tensors["sq_grad_sum"]
        if s is None:
            if any(tensors[key] is not None for key in ("weights", "baseline", "warmup_sum")) or n_steps:
                raise ValueError("ExcessMTL state without 'sq_grad_sum' must be a fresh one (all None, n_steps 0)")
            self.reset()
            return
        if s.dim() != 2 or s.shape[0] == 0 or s.shape[1] == 0 or s.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"ExcessMTL state 'sq_grad_sum' must be a K x N float32 or float64 tensor, got shape "
                f"{tuple(s.shape)} and {s.dtype}"
            )
        k = s.shape[0]
        for key in ("weights", "warmup_sum", "baseline"):
            value = tensors[key]
            if value is None and key != "baseline":
                raise ValueError(f"ExcessMTL state {key!r} is missing (None) although 'sq_grad_sum' is there")
            if value is not None and tuple(value.shape) != (k,):
                raise ValueError(
                    f"ExcessMTL state {key!r} must hold one number per source ({k}), got shape {tuple(value.shape)}"
                )
        if n_steps > self.n_warmup_steps and tensors["baseline"] is None:
            raise ValueError(
                f"ExcessMTL state has {n_steps} calls (past the {self.n_warmup_steps} warmup calls) but no baseline"
            )
        # Copies, moved to the gradients' device and dtype by the next call.
        self._sq_grad_sum = s.detach().clone()
        self._weights = tensors["weights"].detach().clone()
        self._warmup_sum = tensors["warmup_sum"].detach().clone()
        self._baseline = None if tensors["baseline"] is None else tensors["baseline"].detach().clone()
        self._n_steps = n_steps

    def __repr__(self) -> str:
        return (
            f"ExcessMTL(robust_step_size={self.robust_step_size}, n_warmup_steps={self.n_warmup_steps}, "
            f"backend={self.backend!r}, nonfinite={self.nonfinite!r})"
        )
