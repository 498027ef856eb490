"""The gradient stage: named losses -> ``GradientBuffer`` -> the configured aggregator -> ``.grad``.

Each named loss is one gradient source. Its backward pass lands in its row of a ``GradientBuffer``;
the aggregator (PCGrad by default) combines the rows straight into the flat tensor whose views are
the parameters' ``.grad``, so the optimizer steps on the aggregate with nothing copied twice.

Per source, the stage reports (from the aggregation's Gram-space statistics, at no extra pass):

- ``weight``: the source's combination weight (out = sum_k weight_k g_k);
- ``norm``: the norm of its gradient;
- ``share``: its part of the aggregate's weighted magnitude, ``|w_k| |g_k| / sum_j |w_j| |g_j|``;
- ``conflicts``: conflicting projections applied this step (and the rate per source pair);
- ``cosine``: the K x K cosine-similarity matrix of the sources' gradients.

Every step ends with one host read of these few numbers (losses, weights, norms, conflicts, cosine,
the aggregate's norm), which is also what the safety checks need.

A single source whose aggregation is the identity (weight 1 for K = 1: PCGrad, mean, sum) takes a
fast path: a plain ``backward`` into ``.grad`` and one norm, as a bare PyTorch loop would do.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tolaria import aggregation
from tolaria.aggregation import AGGREGATOR_NAMES, Aggregator, GradientBuffer
from tolaria.aggregation.sharded import check_shardable
from tolaria.aggregation.sharded_buffer import FSDPGradientBuffer, ZeroGradientBuffer
from tolaria.distributed import (
    DEFAULT_BUCKET_MB,
    DistributedContext,
    allreduce_gradient_buffer,
    allreduce_mean,
    allreduce_mean_grads,
    check_sharding,
    verify_buffer_layout,
)
from tolaria.telemetry import TelemetryEmitter

from .gradient_modes import GradientModes

_NOT_WRAPPED = (
    "sharding='fsdp' needs a model wrapped by torch.distributed.fsdp.fully_shard (its parameters are DTensors); "
    "wrap it with tolaria.distributed.fsdp_wrap(model, ctx) before building the optimizer, or use sharding='zero' "
    "for a plain model"
)


# One public function of this name, with one default (nonfinite="raise"): the aggregation package's.
build_aggregator = aggregation.build_aggregator


def build_training_aggregator(name: str, **options: Any) -> Aggregator:
    """The aggregator the trainer builds from its config: ``name`` with ``options``, and
    ``nonfinite="propagate"`` unless ``options`` says otherwise (the trainer's own safety checks
    handle non-finite gradients, skip or roll back, from the same host read as its telemetry, so
    the aggregator need not read anything itself). An unknown name raises ``ValueError`` listing
    the valid ones; bad options raise ``ValueError`` naming them (a config error, not a TypeError).
    """
    options = {"nonfinite": "propagate", **options}
    try:
        return aggregation.build_aggregator(name, **options)
    except TypeError as exc:
        raise ValueError(f"bad options {sorted(options)} for aggregator {name!r}: {exc}") from exc


@dataclass(frozen=True)
class SourceStats:
    """One step's per-source numbers, read on the host.

    Attributes:
        names: the K source names, in order.
        losses, weights, norms, shares: per source (see the module docstring).
        conflicts: conflicting projections this step.
        cosine: K x K cosine similarities.
        grad_norm: norm of the aggregated gradient (before clipping).
        finite: whether every loss and gradient norm is finite.
    """

    names: tuple[str, ...]
    losses: tuple[float, ...]
    weights: tuple[float, ...]
    norms: tuple[float, ...]
    shares: tuple[float, ...]
    conflicts: int
    cosine: tuple[tuple[float, ...], ...]
    grad_norm: float
    finite: bool

    @property
    def conflict_rate(self) -> float | None:
        """Conflicts per ordered source pair (PCGrad considers each of the K(K-1) at most once)."""
        k = len(self.names)
        return None if k < 2 else self.conflicts / (k * (k - 1))

    @property
    def total_loss(self) -> float:
        return math.fsum(self.losses)


def as_named_losses(losses: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A loss or a mapping of named losses, checked: each a scalar tensor that requires grad."""
    if isinstance(losses, Tensor):
        named = {"loss": losses}
    elif isinstance(losses, Mapping):
        named = dict(losses)
        if not named:
            raise ValueError("loss_fn returned an empty dict; it needs at least one named loss")
    else:
        raise TypeError(f"loss_fn must return a tensor or a dict of named tensors, got {type(losses).__name__}")
    for name, loss in named.items():
        if not isinstance(name, str):
            raise TypeError(f"loss names must be strings, got {name!r}")
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss {name!r} is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(f"loss {name!r} must be a scalar, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(f"loss {name!r} does not require grad (is it computed from the model's outputs?)")
    return named


def _is_identity_for_one(aggregator: Aggregator) -> bool:
    """Whether one source passes through unchanged, whatever its norm (the fast path's premise).

    Probed on two Gram matrices of different scale: weights that depend on |g| (FairGrad's
    |g|^(-2 alpha / (1 + alpha)), NashMTL's) are 1 at |g| = 1 only. A stateful aggregator is probed
    through a copy, so that the probe is no step of its state.
    """
    if not aggregator.weighted:
        return False
    probe = copy.deepcopy(aggregator) if aggregator.stateful else aggregator
    for scale in (4.0, 0.25):
        gram = torch.full((1, 1), scale, dtype=torch.float64)
        if probe.weighting(gram).weights.tolist() != [1.0]:
            return False
    return True


class GradientStage:
    """Turns each step's named losses into the aggregated ``.grad`` of ``params``, with stats.

    Args:
        params: the model or its parameters (trainable ones are used; tied ones once).
        aggregator: combines the sources (e.g. from :func:`build_aggregator`).
        max_grad_norm: clip the aggregate to this norm (None: no clipping).
        ctx: the distributed context (default: one process). With more than one rank, every step
            averages the K x N buffer over the ranks (one bucketed all-reduce) and the K loss values
            before the aggregation, so every rank aggregates the same buffer; the single-source fast
            path is then not taken (its ``.grad`` would not be averaged).
        bucket_mb: bucket size of that all-reduce, in MiB.
        shared: the shared trunk (a module or parameters among ``params``): only its gradients are
            aggregated, the other parameters (task heads) get their plain gradient, averaged over
            the ranks too. Default: every parameter is aggregated.
        sharding: with more than one rank, ``"none"`` (default: the all-reduce above), ``"zero"``
            (the buffer reduce-scattered by columns, each rank aggregates its K x N / W shard, the
            result all-gathered into ``.grad``: :class:`~tolaria.aggregation.ZeroGradientBuffer`) or
            ``"fsdp"`` (``params`` is a model wrapped by FSDP2's ``fully_shard``, e.g. by
            :func:`tolaria.distributed.fsdp_wrap`; the rows and the ``.grad`` are this rank's shards:
            :class:`~tolaria.aggregation.FSDPGradientBuffer`). Both sharded modes aggregate with one
            all-reduce of the K x K Gram matrix and read the stats off the global one. Ignored in a
            single process.
        mode, level: the ``GradientBuffer`` mode (``"buffer"`` or ``"low_memory"``) and level
            (``"params"`` or ``"features"``: the output of the ``shared`` module); single process
            only; see :mod:`.gradient_modes`. ``telemetry`` receives the low-memory decision.
    """

    def __init__(
        self,
        params: nn.Module | Sequence[Tensor],
        aggregator: Aggregator,
        *,
        max_grad_norm: float | None = None,
        ctx: DistributedContext | None = None,
        bucket_mb: float = DEFAULT_BUCKET_MB,
        shared: nn.Module | Sequence[Tensor] | None = None,
        sharding: str = "none",
        mode: str = "buffer",
        level: str = "params",
        telemetry: TelemetryEmitter | None = None,
    ):
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be a tolaria Aggregator, got {type(aggregator).__name__}")
        if ctx is not None and not isinstance(ctx, DistributedContext):
            raise TypeError(f"ctx must be a DistributedContext or None, got {type(ctx).__name__}")
        self.aggregator = aggregator
        self.max_grad_norm = max_grad_norm
        self.ctx = ctx if ctx is not None else DistributedContext.single_process(torch.device("cpu"))
        self.bucket_mb = bucket_mb
        self.sharding = check_sharding(sharding) if self.ctx.is_distributed else "none"
        if self.sharding != "none":
            check_shardable(aggregator)  # refuses, by name, an aggregator with no sharded form
        self._module = params if isinstance(params, nn.Module) else None  # FSDP reshards through it
        self._first_losses: tuple[Tensor, ...] = ()
        self.modes = GradientModes(
            mode, level, aggregator=aggregator, shared=shared, distributed=self.ctx.is_distributed, telemetry=telemetry
        )
        self.params = [p for p in (params.parameters() if isinstance(params, nn.Module) else params) if p.requires_grad]
        if self.sharding == "fsdp" and not any(hasattr(p, "to_local") for p in self.params):  # DTensors?
            raise ValueError(_NOT_WRAPPED)
        if not self.params:
            raise ValueError("the gradient stage needs at least one parameter with requires_grad=True")
        # The shared trunk (a module is re-read at every rebuild, so grafted layers join it).
        self.shared = shared
        self.names: tuple[str, ...] | None = None
        self.buffer: GradientBuffer | None = None
        self.fast_path = False

    def rebind(self, params: nn.Module | Sequence[Tensor]) -> None:
        """Uses a new parameter set (e.g. after modules were grafted and the optimizer rebuilt)."""
        self._module = params if isinstance(params, nn.Module) else None
        self.params = [p for p in (params.parameters() if isinstance(params, nn.Module) else params) if p.requires_grad]
        if self.names is not None:
            self._build(len(self.names))

    def _build(self, k: int) -> None:
        # Distributed: one source also goes through the buffer, so its gradient is all-reduced.
        self.fast_path = k == 1 and _is_identity_for_one(self.aggregator) and not self.ctx.is_distributed
        if self.fast_path:
            self.buffer = None
        elif self.sharding == "zero":
            self.buffer = ZeroGradientBuffer(self.params, k, shared=self.shared)
        elif self.sharding == "fsdp":
            buffer = GradientBuffer(self._module or self.params, num_sources=k, shared=self.shared)
            if not isinstance(buffer, FSDPGradientBuffer):
                raise ValueError(_NOT_WRAPPED)
            self.buffer = buffer
        else:
            self.buffer = self.modes.build(self.params, k, self.shared, self._first_losses)
        if self.buffer is not None and self.modes.default:  # the other modes run in one process only
            # Every rank, same step: a mismatch raises everywhere. A sharded buffer's rows differ in width
            # between ranks; what they must share is the whole: K sources of N elements of one dtype.
            layout = self.buffer.buffer
            if self.sharding != "none":
                layout = torch.empty((k, self.buffer.numel), dtype=self.buffer.dtype, device="meta")
            verify_buffer_layout(layout, self.ctx)

    def _check_names(self, named: Mapping[str, Tensor]) -> tuple[str, ...]:
        names = tuple(named)
        if self.names is None:
            self.names = names
            self._build(len(names))
        elif names != self.names:
            missing = [n for n in self.names if n not in named]
            extra = [n for n in names if n not in self.names]
            raise ValueError(
                f"loss_fn must return the same named losses every step: expected {list(self.names)}, got "
                f"{list(names)} (missing {missing}, unexpected {extra})"
            )
        return names

    @property
    def _weights_give_norm(self) -> bool:
        # w^T G w is the aggregate's squared norm, unless G is not the parameters' Gram matrix (the
        # features level) or there are no weights (coordinate-wise aggregators): then read the output.
        return self.aggregator.weighted and self.modes.level == "params"

    def forward_context(self) -> AbstractContextManager[None]:
        """Wrap each training forward in this (the trainer does): the low-memory mode measures the
        first one's activations, the features level forgets stale features."""
        return self.modes.forward_context(self.params)

    def zero_grad(self) -> None:
        """Clears gradients before a step (the buffer's rows, and every parameter's ``.grad``)."""
        if self.buffer is not None:
            self.buffer.zero_grad()
        else:
            for p in self.params:
                p.grad = None

    def backward(self, losses: Tensor | Mapping[str, Tensor]) -> SourceStats:
        """Backpropagates every source, aggregates into ``.grad``, clips, and returns the stats."""
        named = as_named_losses(losses)
        self._first_losses = tuple(named.values())  # the first step's graph, for the low-memory estimate
        names = self._check_names(named)
        self._first_losses = ()  # not held past the build: it would keep the step's graph alive
        if self.fast_path:
            return self._backward_single(names, named[names[0]])
        loss_values = torch.stack([loss.detach().reshape(()).double() for loss in named.values()])
        distributed = self.ctx.is_distributed
        if distributed:
            allreduce_mean(loss_values, self.ctx)  # the global batch's losses, identical on every rank
        assert self.buffer is not None
        # "zero": each row reduce-scattered as its source ends; the features level takes the trunk's output
        self.buffer.backward(list(named.values()), **self.modes.backward_kwargs())
        if distributed and self.sharding == "none":
            allreduce_gradient_buffer(self.buffer, self.ctx, self.bucket_mb)  # the step's one big transfer
        if distributed and self.sharding != "fsdp":  # FSDP2 averaged the heads' gradients already
            allreduce_mean_grads(list(self.buffer.unshared_params), self.ctx.world_size)
        heads = [p.grad for p in self.buffer.unshared_params if p.grad is not None]
        if self.sharding == "fsdp":
            heads = [g.to_local() for g in heads]  # their local shards
        _, stats = self.buffer.aggregate(self.aggregator, return_stats=True)
        k = len(names)
        gram = stats.gram.to(torch.float64)
        heads_norm, shared_norm = self._norms(heads, gram.device)
        host = torch.cat(
            [
                loss_values.to(gram.device, torch.float64),
                stats.weights.to(torch.float64),
                stats.conflicts.reshape(1).to(torch.float64),
                heads_norm.reshape(1).to(gram.device, torch.float64),
                shared_norm.reshape(1).to(gram.device, torch.float64),
                gram.reshape(-1),
            ]
        ).tolist()  # the one host read of the step; the rest is K x K arithmetic on host floats
        losses_h, weights, conflicts, heads_h, output_h = (
            host[:k],
            host[k : 2 * k],
            host[2 * k],
            *host[2 * k + 1 : 2 * k + 3],
        )
        g = [host[2 * k + 3 + i * k : 2 * k + 3 + (i + 1) * k] for i in range(k)]
        norms = [_sqrt_nonnegative(g[i][i]) for i in range(k)]
        cosine = [[_cosine(g[i][j], norms[i] * norms[j]) for j in range(k)] for i in range(k)]
        if self._weights_give_norm:
            shared_sq = sum(weights[i] * g[i][j] * weights[j] for i in range(k) for j in range(k))
        else:
            shared_sq = output_h * output_h
        # The whole update's norm: the aggregate on the shared trunk and the heads' plain gradients.
        grad_norm = _sqrt_nonnegative(shared_sq + heads_h * heads_h)
        finite = all(math.isfinite(v) for v in (*losses_h, *norms, grad_norm))
        if finite and self.max_grad_norm is not None and grad_norm > self.max_grad_norm:
            scale = self.max_grad_norm / (grad_norm + 1e-6)
            self.buffer.output.mul_(scale)
            if heads:
                torch._foreach_mul_(heads, scale)
        return SourceStats(
            names=names,
            losses=tuple(losses_h),
            weights=tuple(weights),
            norms=tuple(norms),
            shares=_shares(weights, norms),
            conflicts=int(conflicts) if math.isfinite(conflicts) else 0,
            cosine=tuple(tuple(row) for row in cosine),
            grad_norm=grad_norm,
            finite=finite,
        )

    def _norms(self, heads: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
        """The heads' gradient norm and, without weights (a coordinate-wise aggregator), the aggregate's
        norm read off the result; with "fsdp" both are norms of shards, summed over ranks (one all-reduce)."""
        zero = torch.zeros((), device=device)
        heads_norm = torch.nn.utils.get_total_norm(heads, foreach=True) if heads else zero
        shared_norm = self.buffer.output.norm() if not self._weights_give_norm else zero
        if self.sharding == "fsdp" and (heads or not self._weights_give_norm):
            both = torch.stack([heads_norm.double().square(), shared_norm.to(heads_norm.device).double().square()])
            torch.distributed.all_reduce(both, group=self.buffer.group)
            heads_norm, shared_norm = both.sqrt().unbind()
        return heads_norm, shared_norm

    def _backward_single(self, names: tuple[str, ...], loss: Tensor) -> SourceStats:
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=loss.device)
        loss_h, grad_norm = torch.stack(
            [loss.detach().reshape(()).double(), norm.to(loss.device, torch.float64)]
        ).tolist()
        finite = math.isfinite(loss_h) and math.isfinite(grad_norm)
        if finite and self.max_grad_norm is not None and grad_norm > self.max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, norm, foreach=True)
        return SourceStats(
            names=names,
            losses=(loss_h,),
            weights=(1.0,),
            norms=(grad_norm,),
            shares=(1.0,),
            conflicts=0,
            cosine=((1.0,),),
            grad_norm=grad_norm,
            finite=finite,
        )


def _sqrt_nonnegative(value: float) -> float:
    """sqrt of a Gram-space square (rounding can leave it a hair below zero); NaN stays NaN."""
    return math.sqrt(value) if value > 0 else (0.0 if value <= 0 else value)


def _cosine(dot: float, outer: float) -> float:
    return dot / outer if outer > 0 else 0.0  # 0 where a source has zero norm (or NaN, as the stats do)


def _shares(weights: Sequence[float], norms: Sequence[float]) -> tuple[float, ...]:
    mags = [abs(w) * n for w, n in zip(weights, norms)]
    total = math.fsum(mags)
    if not math.isfinite(total) or total <= 0:
        return tuple(0.0 for _ in mags)
    return tuple(m / total for m in mags)


class SourceAccumulator:
    """Running means of per-source stats over an epoch (or any window) of finite steps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.names: tuple[str, ...] = ()
        self._losses: list[float] = []
        self._weights: list[float] = []
        self._norms: list[float] = []
        self._shares: list[float] = []
        self._cosine: list[list[float]] = []
        self.conflicts = 0

    def add(self, stats: SourceStats) -> None:
        if not stats.finite:
            return
        k = len(stats.names)
        if self.steps == 0 or stats.names != self.names:
            self.reset()
            self.names = stats.names
            self._losses, self._weights, self._norms, self._shares = [0.0] * k, [0.0] * k, [0.0] * k, [0.0] * k
            self._cosine = [[0.0] * k for _ in range(k)]
        self.steps += 1
        for i in range(k):
            self._losses[i] += stats.losses[i]
            self._weights[i] += stats.weights[i]
            self._norms[i] += stats.norms[i]
            self._shares[i] += stats.shares[i]
            for j in range(k):
                self._cosine[i][j] += stats.cosine[i][j]
        self.conflicts += stats.conflicts

    def _mean(self, values: list[float]) -> dict[str, float]:
        return {n: v / self.steps for n, v in zip(self.names, values)} if self.steps else {}

    @property
    def losses(self) -> dict[str, float]:
        return self._mean(self._losses)

    @property
    def conflict_rate(self) -> float | None:
        k = len(self.names)
        if k < 2 or not self.steps:
            return None
        return self.conflicts / (self.steps * k * (k - 1))

    def summary(self) -> dict[str, Any]:
        """Means per source (losses, weights, norms, shares), conflict rate and mean cosine matrix."""
        return {
            "steps": self.steps,
            "sources": list(self.names),
            "losses": self.losses,
            "weights": self._mean(self._weights),
            "norms": self._mean(self._norms),
            "shares": self._mean(self._shares),
            "conflicts": self.conflicts,
            "conflict_rate": self.conflict_rate,
            "cosine": [[v / self.steps for v in row] for row in self._cosine] if self.steps else [],
        }


def emit_step_metrics(telemetry: TelemetryEmitter, stats: SourceStats, lrs: Sequence[float]) -> None:
    """Writes one step's per-source metrics (``train.loss``, ``gradient.*``) and the LR."""
    for i, name in enumerate(stats.names):
        telemetry.metric("train.loss", stats.losses[i], source=name)
        if math.isfinite(stats.weights[i]):  # NaN: a coordinate-wise aggregator has no weights
            telemetry.metric("gradient.weight", stats.weights[i], source=name)
            telemetry.metric("gradient.share", stats.shares[i], source=name)
        telemetry.metric("gradient.norm", stats.norms[i], source=name)
    telemetry.metric("train.lr", lrs[0] if len(lrs) == 1 else list(lrs))
    telemetry.metric("gradient.total_norm", stats.grad_norm)
    if len(stats.names) > 1:
        telemetry.metric("gradient.conflicts", stats.conflicts)
        telemetry.metric("gradient.conflict_rate", stats.conflict_rate)
        telemetry.metric("gradient.cosine", [list(row) for row in stats.cosine], sources=list(stats.names))


__all__ = [
    "AGGREGATOR_NAMES",
    "GradientStage",
    "SourceAccumulator",
    "SourceStats",
    "as_named_losses",
    "build_aggregator",
    "build_training_aggregator",
    "emit_step_metrics",
]
