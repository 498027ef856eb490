"""Small convex programs on the K x K Gram matrix, solved exactly on its device with a fixed budget.

Two quadratic programs recur among the conflict-aware aggregators; both live on G = J J^T:

- the projection onto the dual cone {d : J d >= 0} of the rows of J (UPGrad, DualProj). By
  Proposition 1 of Quinton & Rey (2024), the projection of J^T u is J^T v with
  v = argmin_{v >= u} v^T G v (a "box" problem);
- the min-norm point of the convex hull of the rows (MGDA): w = argmin_{w >= 0, sum w = 1} w^T G w
  (a "simplex" problem). CAGrad's dual is a simplex problem too, with another objective
  (:mod:`tolaria.aggregation.cagrad`), and shares the machinery below.

The solution of such a problem is fixed by its support, the variables off their bound: on a given
support the optimality (Karush-Kuhn-Tucker) conditions are linear equations. So for K up to
``ENUMERATION_MAX_K`` (10) every support is a candidate: the 2^K equality-constrained problems are
solved as one batch, each candidate is scored by how far it is from satisfying all the
optimality conditions (its bounds, the signs of its multipliers, stationarity, checked on G
itself), and the best one is returned. The optimum is always among the candidates: some optimal
point has a support of linearly (for the simplex, affinely) independent rows, whose system is
regular. So the answer is exact to rounding on every input, degenerate ones included, with no
iteration at all; at K = 8 the 256 systems cost less than a loop of tiny operations would.

The systems are symmetric positive semi-definite (the simplex's constraint is folded into the
matrix, see :func:`simplex_solve`), and positive definite exactly where the support is regular, so
they are eliminated without row exchanges, and a support of dependent rows shows as a vanishing
pivot (``PIVOT_ULPS``) and is dropped. Up to K = 8 every operation stays below ``SERIAL_ELEMENTS``,
on the calling thread (see there why that matters).

Beyond ``ENUMERATION_MAX_K``, a batched primal-dual interior-point method (Mehrotra's
predictor-corrector) runs a fixed number of iterations, and the same candidates are formed around
the support it identifies: every combination of its ``LOCAL_BITS`` least certain variables (bound
or not), at two thresholds. The best candidate replaces the interior-point iterate wherever it
satisfies the optimality conditions to ``ACCEPT_TOL``; the tests check both paths against scipy.

Every step is a handful of tensor operations on small matrices, with no data-dependent control
flow, so nothing is read on the host and a CUDA device is never synchronised. G only needs to be
positive semi-definite: zero, duplicate or linearly dependent rows are fine.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MAX_ITERS",
    "DEFAULT_TOL",
    "ENUMERATION_MAX_K",
    "LOCAL_BITS",
    "ACCEPT_TOL",
    "PIVOT_ULPS",
    "SERIAL_ELEMENTS",
    "REGULARIZATION",
    "check_solver_budget",
    "normalized_gram",
    "Supports",
    "supports_from",
    "all_supports",
    "every_support",
    "local_supports",
    "pick_best",
    "times",
    "kkt_violation",
    "Factors",
    "factor",
    "simplex_solve",
    "supports_near",
    "interior_point",
]

DEFAULT_MAX_ITERS = 30
DEFAULT_TOL = 1e-20
# Up to this K every support is enumerated (2^K small systems); beyond, the interior point runs.
ENUMERATION_MAX_K = 10
# The interior point's supports are completed by every combination of this many uncertain variables.
LOCAL_BITS = 5
# A candidate whose worst violation of the optimality conditions (on the unit-scale problem, relative
# to its largest weight where that exceeds 1) is at most this replaces the interior-point iterate.
ACCEPT_TOL = 1e-9
# A pivot below this many rounding units (of the dtype, about 1e-13 in float64) times its
# diagonal entry marks a support whose rows are dependent to rounding: its solution would be
# noise, so the candidate is dropped (a support of independent rows holds an optimum).
PIVOT_ULPS = 500
# Below this many elements torch runs an operation on the calling thread. A batched LAPACK
# factorisation, a BLAS product of more than a few rows, MKL's vector functions (sqrt, exp, log)
# and larger elementwise operations enter the CPU thread pool instead, whose workers then spin for
# milliseconds after it and slow whatever runs its own threads next, such as the compiled CPU
# backend's second pass over J. The candidates for K <= 8 keep below it.
SERIAL_ELEMENTS = 32768
# Tikhonov term added to the interior point's unit-scale matrix. Where G is singular the optimal
# weights are not unique (only J^T v is), and without it the barrier pushes the iterates off along
# the flat directions. It stays at the rounding level of G's largest entries, so that rows many
# orders of magnitude shorter than others still count. The candidates' systems have none.
REGULARIZATION = 1e-15
# The interior point's B systems of size K go into one block-diagonal matrix up to this B K.
_BLOCK_DIAGONAL_MAX = 64


def check_solver_budget(max_iters: int, tol: float, owner: str) -> None:
    """Raises naming ``owner`` when the iteration budget or tolerance cannot work."""
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"{owner} max_iters must be a positive integer, got {max_iters!r}")
    if not (isinstance(tol, (int, float)) and 0 < float(tol) < 1):
        raise ValueError(f"{owner} tolerance must be a number in (0, 1), got {tol!r}")


def normalized_gram(gram: Tensor) -> Tensor:
    """G divided by its trace (the squared Frobenius norm of J); an all-zero G stays zero."""
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    safe = torch.where(trace > 0, trace, torch.ones_like(trace))
    return gram / safe[..., None, None]


class Supports(NamedTuple):
    """Candidate supports and the mask their systems are built from (see :func:`supports_from`)."""

    free: Tensor  # ... x S x K, bool: the variables off their bound
    pair: Tensor  # ... x S x K x K: both variables free
    pivots: Tensor  # ... x S x K, int32: the identity permutation, in LAPACK's 1-based form


def supports_from(free: Tensor) -> Supports:
    """The masks of the supports ``free`` (... x S x K, bool)."""
    k = free.shape[-1]
    pivots = torch.arange(1, k + 1, dtype=torch.int32, device=free.device).expand(free.shape).contiguous()
    return Supports(free, free.unsqueeze(-1) & free.unsqueeze(-2), pivots)


def all_supports(k: int, device: torch.device) -> Tensor:
    """The 2^K subsets of K variables as a (2^K, K) bool tensor: row s holds the bits of s."""
    codes = torch.arange(1 << k, device=device)
    return (codes.unsqueeze(-1).bitwise_right_shift(torch.arange(k, device=device)) & 1).bool()


def every_support(k: int, device: torch.device, nonempty: bool) -> Supports:
    """All 2^K supports (without the empty one if ``nonempty``), built once per K and device.

    Under ``torch.compile`` they are built in the graph instead (a cache is host state).
    """
    if torch.compiler.is_compiling():
        return _build_every_support(k, device, nonempty)
    return _cached_every_support(k, device, nonempty)


def _build_every_support(k: int, device: torch.device, nonempty: bool) -> Supports:
    free = all_supports(k, device)
    return supports_from(free[1:] if nonempty else free)


_cached_every_support = functools.lru_cache(maxsize=64)(_build_every_support)


def local_supports(guess: Tensor, uncertainty: Tensor, bits: int) -> Tensor:
    """Supports near ``guess`` (B x K bool): its ``bits`` most uncertain variables take every value.

    Returns B x 2^bits x K; ``uncertainty`` (B x K) ranks the variables, largest first.
    """
    b, k = guess.shape
    combos = all_supports(bits, guess.device)  # 2^bits x bits
    which = uncertainty.topk(bits, dim=-1).indices.unsqueeze(-2).expand(b, combos.shape[0], bits)
    return guess.unsqueeze(-2).expand(b, combos.shape[0], k).scatter(-1, which, combos.expand(b, -1, -1))


def pick_best(candidates: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """The candidate (``...`` x S x K) of lowest ``score`` (``...`` x S) and that score."""
    best = score.argmin(dim=-1, keepdim=True)
    chosen = candidates.take_along_dim(best.unsqueeze(-1), dim=-2).squeeze(-2)
    return chosen, score.take_along_dim(best, dim=-1).squeeze(-1)


def times(x: Tensor, h: Tensor) -> Tensor:
    """x @ h for x (..., K) and a small K x K h without BLAS (see ``SERIAL_ELEMENTS``): one
    broadcast product where it is small enough, else a sum of K products of x's size."""
    k = h.shape[-1]
    if x.numel() * k < SERIAL_ELEMENTS:
        return (x.unsqueeze(-1) * h).sum(-2)
    out = x[..., :1] * h[0]
    for a in range(1, k):
        out.addcmul_(x[..., a : a + 1], h[a])
    return out


def kkt_violation(free: Tensor, deficit: Tensor, diff: Tensor) -> Tensor:
    """The worst violation of a candidate's optimality conditions, over the last dimension (inf if NaN).

    ``deficit`` is how far the candidate lies below its bound (-w for w >= 0, lower - v for
    v >= lower): it must not be positive on the support ``free``; ``diff`` is the gradient of the
    Lagrangian: 0 on the support, >= 0 off it (the bounds' multipliers).
    """
    return torch.nan_to_num(torch.where(free, torch.maximum(diff.abs(), deficit), -diff).amax(-1), nan=torch.inf)


class Factors(NamedTuple):
    """A batch of factorised symmetric positive semi-definite matrices (see :func:`factor`)."""

    factors: Tensor
    pivots: Tensor | None  # LU's identity pivots; None for a Cholesky factor
    regular: Tensor  # ... x S, bool: no vanishing pivot (see PIVOT_ULPS)

    def solve(self, rhs: Tensor) -> Tensor:
        if self.pivots is None:
            return torch.cholesky_solve(rhs, self.factors)
        return torch.linalg.lu_solve(self.factors, self.pivots, rhs)


def factor(matrices: Tensor, pivots: Tensor) -> Factors:
    """Factors a batch of symmetric positive semi-definite matrices by elimination without exchanges.

    For a positive definite matrix that is as stable as Cholesky's; a pivot is the part of its row
    independent of the rows before it, so a pivot below ``PIVOT_ULPS`` rounding units times its
    diagonal entry marks a (numerically) singular matrix. A batch below ``SERIAL_ELEMENTS`` is eliminated in
    elementwise operations into LU factors (``pivots``, the identity permutation, completes them;
    only the upper triangle is read): LAPACK's batched factorisations enter the thread pool. A
    larger batch is worth the pool, and gets LAPACK's Cholesky factorisation.
    """
    floor = PIVOT_ULPS * torch.finfo(matrices.dtype).eps * matrices.diagonal(dim1=-2, dim2=-1)
    if matrices.numel() >= SERIAL_ELEMENTS:
        cholesky, info = torch.linalg.cholesky_ex(matrices)
        squares = cholesky.diagonal(dim1=-2, dim2=-1).square()
        return Factors(cholesky, None, (info == 0) & (squares > floor).all(-1))
    lu = matrices.clone()
    n = lu.shape[-1]
    for i in range(n - 1):
        row = lu[..., i, i + 1 :]
        multipliers = row / lu[..., i, i : i + 1]  # the column below the pivot, by symmetry
        lu[..., i + 1 :, i + 1 :].addcmul_(multipliers.unsqueeze(-1), row.unsqueeze(-2), value=-1)
        lu[..., i + 1 :, i] = multipliers
    return Factors(lu, pivots, (lu.diagonal(dim1=-2, dim2=-1) > floor).all(-1))


def _box_candidates(h: Tensor, lower: Tensor, supports: Supports, diagonal: bool = False) -> tuple[Tensor, Tensor]:
    """The minimisers of v^T H v with v = lower off each support, and their optimality scores.

    ``lower`` is B x K (K x K and diagonal if ``diagonal``); the supports are S x K (the same for
    every problem) or B x S x K. Returns v (B x S x K) and the scores (B x S): the worst violation
    of v_F >= lower_F, (H v)_F = 0 and (H v)_A >= 0 (the multipliers of the bounds), inf where the
    solve failed.
    """
    k = h.shape[-1]
    shared = supports.free.dim() == 2
    # Shared supports: the work is laid out S x B x K, so that one factorisation per support solves
    # all B problems from one column-major block (what LAPACK reads without a copy).
    free = supports.free.unsqueeze(1) if shared else supports.free  # S x 1 x K, or B x S x K
    bound = lower.unsqueeze(0) if shared else lower.unsqueeze(-2)  # 1 x B x K, or B x 1 x K
    factors = factor(torch.where(supports.pair, h, torch.eye(k, dtype=h.dtype, device=h.device)), supports.pivots)
    if diagonal:  # lower_b = l_b e_b (shared supports): H's row b, where b is off the support
        fixed_times_h = (lower.diagonal() * ~supports.free).unsqueeze(-1) * h  # S x B x K
    else:
        fixed_times_h = times(torch.where(free, 0.0, bound), h)  # (lower, 0 on F) H
    rhs = torch.where(free, -fixed_times_h, bound)  # H_FF v_F = -H_FA lower_A
    v = factors.solve(rhs.mT).mT if shared else factors.solve(rhs.unsqueeze(-1)).squeeze(-1)
    grad = times(v, h)
    violation = kkt_violation(free, bound - v, grad)
    violation = torch.where(factors.regular.unsqueeze(1) if shared else factors.regular, violation, torch.inf)
    if shared:
        return v.transpose(0, 1), violation.transpose(0, 1)
    return v, violation


def simplex_solve(h: Tensor, rhs: Tensor, supports: Supports) -> tuple[Tensor, Tensor, Tensor]:
    """Solves (H + a 1 1^T)_SS X_S = rhs_S (X = 0 off S) for every support S (S x K x M rhs).

    On the simplex sum w = 1, so H_SS w_S = nu 1 is (H + a 1 1^T)_SS w_S = (nu + a) 1: the
    constraint enters the matrix instead of bordering it, and the matrix is positive definite
    exactly when the gradients on S are affinely independent (when the bordered system is regular),
    so it needs no row exchanges. a is S's largest diagonal entry of H (1 if it is 0), which keeps
    the rank-one term at the scale of H_SS. Returns X, a (S x 1) and which supports are regular.
    """
    k = h.shape[-1]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    scale = torch.where(supports.free, h.diagonal(), 0.0).amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, 1.0)
    factors = factor(torch.where(supports.pair, h + scale.unsqueeze(-1), eye), supports.pivots)
    return factors.solve(torch.where(supports.free.unsqueeze(-1), rhs, 0.0)), scale, factors.regular


def _simplex_candidates(h: Tensor, supports: Supports) -> tuple[Tensor, Tensor]:
    """The minimisers of w^T H w on the simplex restricted to each support (S x K), and their scores.

    On S the conditions read H_SS w_S = nu 1 and sum w = 1 (nu: the multiplier of the sum); the
    score is the worst violation of w >= 0, (H w)_S = nu and (H w)_A >= nu.
    """
    ones = torch.ones((h.shape[-1], 1), dtype=h.dtype, device=h.device)
    z, scale, regular = simplex_solve(h, ones, supports)  # (H + a 1 1^T) z = 1: w = z / sum z
    total = z.squeeze(-1).sum(-1, keepdim=True)
    w = z.squeeze(-1) / total
    diff = times(w, h) - (1 / total - scale)  # H w - nu
    return w, torch.where(regular, kkt_violation(supports.free, -w, diff), torch.inf)


def supports_near(slack: Tensor, multiplier: Tensor, bits: int = LOCAL_BITS) -> Tensor:
    """Candidate supports (B x S x K) from a final interior-point iterate (slacks and multipliers).

    A bound is inactive where its slack exceeds its multiplier (log ratio > 0); the variables whose
    log ratio is nearest that threshold take every value. A second set does the same around the
    largest gap of the sorted log ratios, which still separates the bounds where the problem is
    degenerate (slack and multiplier both tending to 0, e.g. at a zero gradient).
    """
    k = slack.shape[-1]
    bits = min(k, bits)
    ratio = slack.log() - multiplier.log()
    ordered, _ = ratio.sort(dim=-1)
    cut = ordered.diff(dim=-1).argmax(dim=-1, keepdim=True)
    gap = (ordered.gather(-1, cut) + ordered.gather(-1, cut + 1)) / 2
    return torch.cat(
        (
            local_supports(ratio > 0, -ratio.abs(), bits),
            local_supports(ratio > gap, -(ratio - gap).abs(), bits),
        ),
        dim=-2,
    )


def _step_to_boundary(value: Tensor, step: Tensor) -> Tensor:
    """min(1, the largest a with value + a * step >= 0), per batch row (B x 1); value > 0."""
    return (-step / value).amax(dim=-1, keepdim=True).clamp(min=1.0).reciprocal()


def interior_point(
    h: Tensor,
    lower: Tensor,
    *,
    simplex: bool,
    max_iters: int,
    tol: float,
    linear: Tensor | None = None,
    regularization: float = REGULARIZATION,
) -> tuple[Tensor, Tensor, Tensor]:
    """Approximately solves min 1/2 x^T H x + q^T x s.t. x >= lower (and sum x = 1 if ``simplex``).

    Primal-dual path following with Mehrotra's predictor-corrector, on the slack s = x - lower and
    the multipliers z >= 0 of the bounds (nu for the equality), for each row of ``lower`` (B x K)
    and of ``linear`` (q, B x K, default 0). H is K x K, or B x K x K (one per problem), positive
    semi-definite and scaled to O(1) entries. Returns the final (x, s, z), each B x K; a row whose
    duality gap falls to ``tol`` times its objective is frozen (so ``tol`` bounds the relative
    excess of the objective). ``regularization`` is added to H's diagonal (see ``REGULARIZATION``).
    The loop is written for few tensor operations: on K x K problems each one costs its dispatch,
    not its arithmetic.
    """
    b, k = lower.shape
    dtype, device = h.dtype, h.device
    h = h + regularization * torch.eye(k, dtype=dtype, device=device)
    q = torch.zeros_like(lower) if linear is None else linear
    s = torch.full((b, k), 1.0 / k if simplex else 1.0, dtype=dtype, device=device)
    x = lower + s
    z = torch.ones((b, k), dtype=dtype, device=device)
    nu = torch.zeros((b, 1), dtype=dtype, device=device)
    ones = torch.ones((b, k, 1), dtype=dtype, device=device)
    # Few small systems go into one block-diagonal matrix: one LAPACK call, where a batch would loop
    # over a thread pool (and stall on a busy CPU). Beyond, the dense matrix would cost (B K)^3.
    block_diagonal = b * k <= _BLOCK_DIAGONAL_MAX
    block_mask = torch.eye(b, dtype=dtype, device=device)[:, None, :, None]  # B x 1 x B x 1
    # The systems' shape (one block-diagonal matrix or a batch) and the right-hand sides' shape.
    rows = (b * k, 1) if block_diagonal else (b, k, 1)

    for _ in range(max_iters):
        # The Newton system for (dx, dnu) once dz = (t - z dx) / s is eliminated, for a target t of
        # the complementarity s z: (H + diag(z / s)) dx - dnu 1 = nu 1 - H x + t / s (the stationarity
        # residual H x - z - nu 1 with z moved into t / s), and 1^T dx = 1 - 1^T x.
        xh = (x.unsqueeze(-2) @ h).squeeze(-2)
        grad = nu - q - xh
        sz = s * z
        mu = sz.mean(dim=-1, keepdim=True)
        blocks = torch.diag_embed(z / s) + h
        if block_diagonal:
            blocks = (blocks.unsqueeze(2) * block_mask).reshape(b * k, b * k)
        lu, pivots, _ = torch.linalg.lu_factor_ex(blocks)
        if simplex:
            gap = 1 - x.sum(dim=-1, keepdim=True)
            base = torch.linalg.lu_solve(lu, pivots, ones.reshape(rows)).reshape(b, k, 1)  # M^-1 1
            base_sum = base.sum(dim=1)

        # Called only within this iteration, so it sees this iteration's factors (hence the noqa).
        def solve(rhs: Tensor) -> tuple[Tensor, Tensor]:  # noqa: B023
            a = torch.linalg.lu_solve(lu, pivots, rhs.reshape(rows)).reshape(b, k)  # noqa: B023
            if not simplex:
                return a, nu  # noqa: B023
            d_nu = (gap - a.sum(dim=-1, keepdim=True)) / base_sum  # noqa: B023
            return torch.addcmul(a, d_nu, base.squeeze(-1)), d_nu  # noqa: B023

        # Predictor: the affine-scaling direction (target s z = 0).
        dx_aff, _ = solve(grad)
        dz_aff = -torch.addcmul(z, z / s, dx_aff)
        a_aff = torch.minimum(_step_to_boundary(s, dx_aff), _step_to_boundary(z, dz_aff))
        mu_aff = ((s + a_aff * dx_aff) * (z + a_aff * dz_aff)).mean(dim=-1, keepdim=True)
        sigma = (mu_aff / mu).clamp(0, 1) ** 3
        # Corrector: centring plus the second-order term of the complementarity.
        target = sigma * mu - sz - dx_aff * dz_aff
        dx, d_nu = solve(grad + z + target / s)
        dz = (target - z * dx) / s
        # The step fraction tends to 1 as mu falls (a fast end game). A row is frozen once its duality
        # gap s^T z = K mu, which bounds how far its objective lies above the optimum, is at most
        # `tol` times that objective: a relative stopping rule, met at loose tolerances too.
        fraction = 1 - mu.clamp(1e-8, 1e-2)
        objective = ((xh / 2 + q) * x).sum(dim=-1, keepdim=True)
        running = sz.sum(dim=-1, keepdim=True) > tol * objective.abs()
        step = fraction * torch.minimum(_step_to_boundary(s, dx), _step_to_boundary(z, dz)) * running
        move = step * dx
        x = x + move
        s = s + move
        z = torch.addcmul(z, step, dz)
        if simplex:
            nu = torch.addcmul(nu, step, d_nu)
    return x, s, z
