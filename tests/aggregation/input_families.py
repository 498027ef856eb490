"""Input families for the aggregator property suite, built from their definitions.

Each family is a list of ``Case``s (a name and a float64 K x N matrix; the suite casts it to the
dtype under test). K goes up to 20 and N from 1 to 100; a fixed seed keeps them the same everywhere.

- ``ranked``: J = A B with A (K x r) and B (r x N) normal, so rank(J) = r, from full rank down to 1;
- ``scaled``: ``ranked`` times 1e-7, 1e-3, 1e3 and 1e10;
- ``zero``: all-zero matrices;
- ``strongly_stationary``: some w > 0 has w^T J = 0 (the columns of J are orthogonal to w);
- ``weakly_not_strongly_stationary``: some w >= 0, w != 0, with a zero entry has w^T J = 0, and no
  w > 0 does (a column of J is positive exactly where w is 0);
- ``not_weakly_stationary``: no w >= 0, w != 0, has w^T J = 0 (a column of J is positive everywhere);
- ``near_opposite``: rank-deficient matrices with two rows opposite up to a factor (the hard case
  of a rank-deficient G with a near-cancellation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["FAMILIES", "Case", "all_cases"]


class Case(NamedTuple):
    name: str
    matrix: Tensor  # float64, K x N


_GEN = torch.Generator().manual_seed(20261206)


def _normal(*shape: int, generator: torch.Generator | None = None) -> Tensor:
    return torch.randn(*shape, generator=generator or _GEN, dtype=torch.float64)


def _orthogonal_to(w: Tensor, columns: int) -> Tensor:
    """K x columns normal columns projected onto the complement of w."""
    p = _normal(w.shape[0], columns)
    return p - torch.outer(w, w @ p) / (w @ w)


def ranked(k: int, n: int, rank: int, generator: torch.Generator | None = None) -> Tensor:
    """K x N of rank ``rank``; ``generator`` (default: the families' own) draws it."""
    return _normal(k, rank, generator=generator) @ _normal(rank, n, generator=generator)


def strongly_stationary(k: int, n: int, rank: int) -> Tensor:
    w = _normal(k).abs() + 0.1
    return _orthogonal_to(w, rank) @ _normal(rank, n)


def weakly_not_strongly_stationary(k: int, n: int, rank: int) -> Tensor:
    # w > 0 on the first `support` rows, 0 on the others; the first column is 0 on the support and
    # positive elsewhere, so w^T J = 0 and every w' >= 0 with w'^T J = 0 vanishes off the support.
    support = max(2, k // 2)
    w = torch.zeros(k, dtype=torch.float64)
    w[:support] = _normal(support).abs() + 0.1
    positive_off_support = torch.zeros(k, 1, dtype=torch.float64)
    positive_off_support[support:, 0] = _normal(k - support).abs() + 0.1
    columns = torch.cat([positive_off_support, _orthogonal_to(w, rank - 1)], dim=1)
    return columns @ _normal(rank, n)


def not_weakly_stationary(k: int, n: int, rank: int) -> Tensor:
    positive = (_normal(k).abs() + 0.1).unsqueeze(1)
    return torch.cat([positive, _normal(k, rank - 1)], dim=1) @ _normal(rank, n)


def near_opposite(k: int, n: int, rank: int, factor: float) -> Tensor:
    j = ranked(k, n, rank)
    j[2] = factor * j[1] + 1e-3 * j[2] / j[2].norm() * j[1].norm()
    return j


_RANKED = [
    (1, 1, 1),
    (2, 5, 1),
    (2, 5, 2),
    (4, 3, 2),
    (5, 3, 3),
    (8, 20, 8),
    (9, 11, 5),
    (12, 40, 6),
    (20, 10, 10),
    (20, 100, 20),
]
_STATIONARY = [(3, 4, 2), (5, 3, 3), (9, 11, 6), (7, 13, 2), (16, 30, 8), (20, 50, 12)]


def _cases() -> dict[str, list[Case]]:
    families: dict[str, list[Case]] = {
        "ranked": [Case(f"ranked{k}x{n}r{r}", ranked(k, n, r)) for k, n, r in _RANKED],
        "zero": [Case(f"zero{k}x{n}", torch.zeros(k, n, dtype=torch.float64)) for k, n in [(1, 1), (4, 3), (9, 11)]],
        "strongly_stationary": [Case(f"strong{k}x{n}r{r}", strongly_stationary(k, n, r)) for k, n, r in _STATIONARY],
        "weakly_not_strongly_stationary": [
            Case(f"weak{k}x{n}r{r}", weakly_not_strongly_stationary(k, n, r)) for k, n, r in _STATIONARY
        ],
        "not_weakly_stationary": [
            Case(f"nonweak{k}x{n}r{r}", not_weakly_stationary(k, n, r)) for k, n, r in _STATIONARY
        ],
        "near_opposite": [
            Case(f"opposite{k}x{n}r{r}f{f}", near_opposite(k, n, r, f))
            for k, n, r, f in [(5, 3, 3, -1.2), (8, 6, 5, -0.9), (12, 10, 8, -1.5), (20, 10, 10, -1.1)]
        ],
    }
    families["scaled"] = [
        Case(f"{case.name}x{scale:g}", case.matrix * scale)
        for scale in (1e-7, 1e-3, 1e3, 1e10)
        for case in families["ranked"][2::2]
    ]
    return families


FAMILIES: dict[str, list[Case]] = _cases()


def all_cases(*names: str) -> list[Case]:
    """Every case of the named families (all families if none is named)."""
    return [case for name in (names or FAMILIES) for case in FAMILIES[name]]
