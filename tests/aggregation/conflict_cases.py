"""Gradient matrices shared by the tests of the Gram-space conflict-aware aggregators (float64)."""

import torch

KINDS = ("random", "conflicting", "duplicate", "zero_row", "low_rank", "scaled")

# Cases beyond ENUMERATION_MAX_K sources, where the interior point runs (N < K in the second).
BEYOND_ENUMERATION = [(kind, k, n) for kind in KINDS for k, n in ((12, 60), (16, 5))]


def make_jacobian(kind: str, k: int, n: int, seed: int = 0) -> torch.Tensor:
    """A K x N float64 matrix of the given kind; N >> K is the realistic case."""
    gen = torch.Generator().manual_seed(seed * 1009 + k * 31 + n)
    j = torch.randn((k, n), generator=gen, dtype=torch.float64)
    if kind == "conflicting" and k > 1:
        j[1] = -0.8 * j[0] + 0.3 * j[1]
    elif kind == "duplicate" and k > 1:
        j[1] = j[0]
    elif kind == "zero_row":
        j[0] = 0
    elif kind == "low_rank":
        j = torch.randn((k, 2), generator=gen, dtype=torch.float64) @ torch.randn(
            (2, n), generator=gen, dtype=torch.float64
        )
    elif kind == "scaled":
        j = j * torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]
    return j


def cases(ks=(1, 2, 3, 5, 8), n=60, kinds=KINDS):
    return [(kind, k, n) for kind in kinds for k in ks if not (k == 1 and kind in ("conflicting", "duplicate"))]
