"""Eigendecomposition of the K x K Gram matrix without a host round trip.

``torch.linalg.eigh`` checks LAPACK's status on the host: harmless on the CPU, a synchronisation on
CUDA. So on the CPU it is used as is, and on every other device the decomposition is a cyclic
Jacobi method with a fixed number of sweeps, written in plain tensor operations: each round rotates
K/2 disjoint (p, q) pairs at once (round-robin order), so a sweep is K - 1 rounds. Jacobi converges
quadratically; ``sweeps_for(k)`` sweeps leave off-diagonal entries at rounding level for K <= 64
(the tests check it against LAPACK on the CPU).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["METHODS", "sweeps_for", "symmetric_eig", "jacobi_eig"]

METHODS = ("auto", "lapack", "jacobi")


def sweeps_for(k: int) -> int:
    """Jacobi sweeps for a K x K matrix: quadratic convergence needs few, a few more for large K."""
    return 6 + math.ceil(math.log2(max(k, 2)))


def symmetric_eig(a: Tensor, *, method: str = "auto") -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors (columns) of the symmetric K x K ``a``.

    ``method``: ``"auto"`` (LAPACK on the CPU, Jacobi elsewhere), ``"lapack"`` or ``"jacobi"``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown eigendecomposition method {method!r}; valid: {', '.join(METHODS)}")
    if method == "lapack" or (method == "auto" and a.device.type == "cpu"):
        return torch.linalg.eigh(a)
    return jacobi_eig(a)


@lru_cache(maxsize=64)
def _schedule(m: int) -> tuple[tuple[list[int], list[int]], ...]:
    """Round-robin pairings of m (even) indices: m - 1 rounds of m / 2 disjoint (p, q) pairs."""
    players = list(range(m))
    rounds = []
    for _ in range(m - 1):
        pairs = [(players[i], players[m - 1 - i]) for i in range(m // 2)]
        rounds.append(([min(p) for p in pairs], [max(p) for p in pairs]))
        players = [players[0], players[-1], *players[1:-1]]
    return tuple(rounds)


@lru_cache(maxsize=64)
def _schedule_on(m: int, device: torch.device) -> tuple[tuple[Tensor, Tensor], ...]:
    # Index tensors copied to the device once per (size, device): a host-to-device copy on every
    # call would synchronise the stream and could not be captured in a CUDA graph.
    return tuple((torch.tensor(p, device=device), torch.tensor(q, device=device)) for p, q in _schedule(m))


def jacobi_eig(a: Tensor, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """Cyclic Jacobi eigendecomposition of the symmetric K x K ``a``, fixed sweeps, no host reads."""
    k = a.shape[-1]
    m = k + (k % 2)  # an odd K gets a zero row and column: its rotations are all the identity
    work = torch.zeros((m, m), dtype=a.dtype, device=a.device)
    work[:k, :k] = (a + a.mT) / 2
    vectors = torch.eye(m, dtype=a.dtype, device=a.device)
    eye = vectors.clone()
    rounds = _schedule_on(m, a.device)
    for _ in range(sweeps if sweeps is not None else sweeps_for(k)):
        for p, q in rounds:
            diagonal = work.diagonal()
            a_pp, a_qq, a_pq = diagonal[p], diagonal[q], work[p, q]
            # Golub & Van Loan's sym.schur2: t = tan(theta) zeroes a_pq; t = 0 where a_pq = 0.
            diff = a_qq - a_pp
            sign = torch.where(diff >= 0, 1.0, -1.0)
            denom = diff.abs() + torch.hypot(diff, 2 * a_pq)
            t = 2 * a_pq * sign / torch.where(denom > 0, denom, 1.0)
            c = torch.rsqrt(1 + t * t)
            s = t * c
            rotation = eye.index_put((torch.cat((p, q, p, q)), torch.cat((p, q, q, p))), torch.cat((c, c, s, -s)))
            work = rotation.mT @ work @ rotation
            vectors = vectors @ rotation
    values = work.diagonal()[:k]
    order = values.argsort()
    return values[order], vectors[:k, :k][:, order]
