"""PyTorch Lightning: a ``LightningModule`` whose ``training_step`` returns named losses, one gradient source each.

Install with ``pip install 'tolaria[lightning]'``. Put :class:`MultiSourceMixin` before ``LightningModule``
and return a dict of losses from ``training_step``; every step then backpropagates each loss into its
row of a :class:`~tolaria.aggregation.GradientBuffer`, aggregates the rows with any Tolaria aggregator
(an instance, or a name from ``AGGREGATOR_NAMES``) and steps the optimizer::

    class TwoHeads(MultiSourceMixin, L.LightningModule):
        def __init__(self):
            super().__init__(aggregator="pcgrad", shared="trunk")   # the trunk's K gradients are aggregated
            self.trunk, self.left, self.right = nn.Linear(8, 16), nn.Linear(16, 1), nn.Linear(16, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.trunk(x).relu()
            return {"left": F.mse_loss(self.left(h), y[:, :1]), "right": F.mse_loss(self.right(h), y[:, 1:])}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.Trainer(max_steps=100).fit(TwoHeads(), loader)

Design: a mixin for manual optimisation, not a ``Callback``. Lightning's automatic optimisation runs one
backward pass on one loss, and a callback cannot turn it into K passes (``on_before_backward`` sees the
summed loss, already scaled); stepping from ``on_train_batch_end`` would happen outside Lightning's
optimisation loop, so ``global_step``, ``max_steps`` and step-interval schedulers would never advance.
Manual optimisation is Lightning's own way to run several backward passes per step, so the mixin sets
``automatic_optimization = False`` and wraps the ``training_step`` of every subclass: when it returns a
mapping of losses, :meth:`MultiSourceMixin.multi_source_step` does, inside the step,

1. ``self.manual_backward(loss_k)`` for each source, with row k of the buffer bound to the shared
   parameters' ``.grad``: Lightning's precision plugin scales each loss (AMP) and runs its hooks;
2. under ``strategy="ddp"``, one mean all-reduce of the K x N buffer (and of the heads' plain gradients),
   instead of DDP's per-backward hooks. DDP's own gradient sync is switched off for the run
   (``require_backward_grad_sync = False``, which keeps both its forward and Lightning's
   ``manual_backward`` from arming the reducer): with it, DDP would all-reduce the whole model once per
   source, and with ``find_unused_parameters=False`` (Lightning's default) a head that one source does
   not reach would hang or fail the reducer. Each source's gradient is thus averaged over the ranks
   exactly once, every rank aggregates the same buffer with an identically seeded generator, and the
   replicas stay identical. DDP still broadcasts rank 0's parameters when it wraps the model; the
   mixin broadcasts rank 0's module buffers after each step when ``broadcast_buffers`` is on, as DDP
   would before the next forward;
3. with a ``GradScaler`` (``precision="16-mixed"``), the buffer and the heads' gradients are unscaled
   and checked for inf/NaN in one pass before aggregating, since most aggregators are not scale
   invariant (Nash-MTL's weights, thresholds, regularisers). A non-finite step is not aggregated (a
   stateful aggregator's state stays clean): the non-finite gradients reach the optimizer, so the
   scaler skips the step and lowers its scale as usual. Otherwise the aggregate is clipped
   (``gradient_clip_val``: Lightning refuses ``Trainer(gradient_clip_val=...)`` with manual
   optimisation) and multiplied back by the scale (a power of two: exact), so that Lightning's own
   ``unscale_`` before ``optimizer.step()`` yields it unchanged and ``on_before_optimizer_step``
   sees the unscaled aggregate;
4. ``optimizer.step()`` through Lightning (progress, hooks, precision), the LR schedulers configured
   with ``interval="step"`` (``"epoch"`` ones at the end of each epoch), and ``self.log`` of the
   per-source losses, weights, norms and the number of conflicts (from the Gram matrix: no extra pass).

The aggregator's state (stateful aggregators) and the state of its generator travel in Lightning's
checkpoints under ``checkpoint["tolaria"]``, so a resumed run repeats the weights of an uninterrupted one.

Limits: one optimizer; DDP (``ddp``, ``ddp_spawn``, ...) or a single device, not FSDP or DeepSpeed (the
buffer needs the full parameters on each rank) nor DDP's ``static_graph``; every rank must step together
(returning None from ``training_step`` on one rank only would leave the others waiting). If you override
``on_train_start``, ``on_train_epoch_end``, ``on_save_checkpoint`` or ``on_load_checkpoint``, call
``super()``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
except ImportError as exc:  # the extra is optional; say how to get it
    raise ImportError(
        f"tolaria.integrations.lightning needs PyTorch Lightning >= 2.2: pip install 'tolaria[lightning]' ({exc})"
    ) from exc

from tolaria.aggregation import AggregationStats, Aggregator, GradientBuffer, aggregator_class
from tolaria.integrations._gradients import unscale_found_inf

__all__ = ["CHECKPOINT_KEY", "MultiSourceMixin"]

CHECKPOINT_KEY = "tolaria"  # where the aggregator's state lives in a Lightning checkpoint

_AggregatorLike = Aggregator | Callable[[Tensor], Tensor]
_Shared = str | nn.Module | Iterable[Tensor] | None


def _make_aggregator(
    aggregator: _AggregatorLike | str, options: Mapping[str, Any] | None, seed: int
) -> _AggregatorLike:
    if isinstance(aggregator, str):
        options = dict(options or {})
        cls = aggregator_class(aggregator)
        if cls.takes_generator() and "generator" not in options and "seed" not in options:
            # Seeded alike in every process with no communication: DDP ranks draw the same shuffles.
            options["generator"] = torch.Generator().manual_seed(seed)
        return cls(**options)
    if options:
        raise ValueError("aggregator_options go with an aggregator name; configure an instance yourself")
    if isinstance(aggregator, Aggregator) or callable(aggregator):
        return aggregator
    raise TypeError(
        f"aggregator must be a Tolaria aggregator, a registry name or a callable on the K x N matrix, "
        f"got {type(aggregator).__name__}"
    )


def _generator_of(aggregator: _AggregatorLike) -> torch.Generator | None:
    generator = getattr(aggregator, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


class _State:
    """Everything the mixin keeps; a plain object, so nn.Module does not register the shared module twice."""

    def __init__(
        self,
        aggregator: _AggregatorLike,
        shared: _Shared,
        clip_val: float | None,
        clip_algorithm: str,
        accumulate: int,
        log_stats: bool,
        log_prefix: str,
    ):
        self.aggregator = aggregator
        self.shared = list(shared) if shared is not None and not isinstance(shared, (str, nn.Module)) else shared
        self.clip_val, self.clip_algorithm = clip_val, clip_algorithm
        self.accumulate, self.log_stats, self.log_prefix = accumulate, log_stats, log_prefix
        self.names: tuple[str, ...] | None = None
        self.buffer: GradientBuffer | None = None
        self.pending = 0  # batches backpropagated since the last optimizer step
        self.depth = 0  # nesting of wrapped training_step calls (super().training_step inside one)
        self.stepped = False  # multi_source_step already ran in this training_step

    def check_names(self, losses: Any) -> tuple[str, ...]:
        if not isinstance(losses, Mapping) or not losses:
            raise TypeError(
                f"training_step must return a non-empty mapping of named losses, got {type(losses).__name__}"
            )
        for name, loss in losses.items():
            if not isinstance(name, str):
                raise TypeError(f"loss names must be strings, got {name!r}")
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(
                    f"loss {name!r} must be a scalar tensor, got "
                    f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}"
                )
            if not loss.requires_grad:
                raise ValueError(f"loss {name!r} does not require grad: it has no gradient to aggregate")
        names = tuple(losses)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(
                f"training_step must return the same named losses every step, in the same order: "
                f"expected {list(self.names)}, got {list(names)}"
            )
        return names

    def buffer_for(self, module: nn.Module, k: int) -> GradientBuffer:
        buffer = self.buffer
        first = buffer.params[0] if buffer is not None else None
        # Built on first use: Lightning has moved and cast the model by then (device, precision).
        if buffer is None or buffer.num_sources != k or first.device != buffer.device or first.dtype != buffer.dtype:
            shared = self.shared
            if isinstance(shared, str):
                shared = functools.reduce(getattr, shared.split("."), module)
            self.buffer = buffer = GradientBuffer(module, num_sources=k, shared=shared)
            self.pending = 0
        return buffer

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"names": list(self.names) if self.names is not None else None}
        agg = self.aggregator
        if isinstance(agg, Aggregator) and agg.stateful:
            state["aggregator"] = {"class": type(agg).__name__, "state": agg.state_dict()}
        generator = _generator_of(agg)
        if generator is not None and "aggregator" not in state:  # a stateful one keeps its generator itself
            state["generator"] = generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        agg = self.aggregator
        state = state if isinstance(state, Mapping) else {}
        if state.get("names") is not None:
            self.names = tuple(state["names"])
        generator = _generator_of(agg)
        if generator is not None and "generator" in state:
            generator.set_state(state["generator"])
        if not (isinstance(agg, Aggregator) and agg.stateful):
            return
        saved = state.get("aggregator")
        if isinstance(saved, Mapping) and saved.get("class") == type(agg).__name__:
            agg.load_state_dict(dict(saved["state"]))
            return
        warnings.warn(
            f"the checkpoint holds no state for the aggregator {type(agg).__name__}; it starts from its "
            "initial state, so its weights differ from the saved run's until its state has caught up",
            RuntimeWarning,
            stacklevel=3,
        )
        agg.reset()


def _ddp_wrapper(trainer: pl.Trainer) -> nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper, with its own gradient sync switched off; None on a single device."""
    strategy = trainer.strategy
    model = strategy.model
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    # DeepSpeed's strategy subclasses DDPStrategy without a DDP wrapper: check the wrapper, not only the class.
    if not (isinstance(strategy, SingleDeviceStrategy) or (isinstance(strategy, DDPStrategy) and ddp)):
        raise NotImplementedError(
            f"MultiSourceMixin runs on one device or under DDP (strategy='ddp'), not {type(strategy).__name__}: "
            "the gradient buffer needs the full parameters on every rank"
        )
    if not ddp:
        return None
    if getattr(model, "static_graph", False):
        raise NotImplementedError(
            "MultiSourceMixin does not support DDP's static_graph=True (its first-iteration "
            "all-reduce ignores require_backward_grad_sync); use DDPStrategy() without it"
        )
    # Off before any backward of the run, so nothing ever arms the reducer (see the module docstring).
    model.require_backward_grad_sync = False
    return model


def _row_sum(rows: Tensor) -> Tensor:
    return rows.sum(0)


class MultiSourceMixin:
    """Trains a ``LightningModule`` whose ``training_step`` returns a mapping of named losses.

    Use it as ``class Net(MultiSourceMixin, L.LightningModule)`` and pass the options below through
    ``super().__init__(...)``. See the module docstring for what a step does and why.

    Args:
        aggregator: a Tolaria aggregator, a name from ``tolaria.aggregation.AGGREGATOR_NAMES``, or any
            callable mapping the K x N matrix to an N-vector (no stats, no checkpointed state).
        aggregator_options: keyword arguments for the aggregator built from a name. An aggregator that
            draws random numbers gets a CPU generator seeded with ``seed`` unless these name one.
        shared: the parameters whose K gradients are aggregated: an attribute name (``"trunk"``,
            ``"encoder.layers"``), a module or parameters; None (default): all of them. The others
            (task heads) get their plain gradient, the sum over the sources that reach them.
        seed: the seed of that generator (the same on every rank, so the replicas stay identical).
        gradient_clip_val: clip the aggregated update (heads included) to this norm or value, after
            unscaling; None: no clipping.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        accumulate_grad_batches: step every this many batches (and at the last batch of an epoch), each
            loss divided by it, as Lightning's automatic optimisation does.
        log_stats: ``self.log`` the per-source losses, weights and gradient norms and the conflicts,
            at every step, under ``log_prefix`` (``tolaria/loss/<name>``, ``tolaria/weight/<name>``...).
        log_prefix: the prefix of those keys.
    """

    def __init__(
        self,
        *args: Any,
        aggregator: _AggregatorLike | str = "pcgrad",
        aggregator_options: Mapping[str, Any] | None = None,
        shared: _Shared = None,
        seed: int = 0,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
        log_stats: bool = True,
        log_prefix: str = "tolaria/",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if not isinstance(self, pl.LightningModule):
            raise TypeError(
                "MultiSourceMixin goes before LightningModule: class Net(MultiSourceMixin, L.LightningModule)"
            )
        if (
            isinstance(accumulate_grad_batches, bool)
            or not isinstance(accumulate_grad_batches, int)
            or accumulate_grad_batches < 1
        ):
            raise ValueError(f"accumulate_grad_batches must be an int >= 1, got {accumulate_grad_batches!r}")
        if gradient_clip_val is not None and (isinstance(gradient_clip_val, bool) or not gradient_clip_val > 0):
            raise ValueError(f"gradient_clip_val must be a number > 0 or None, got {gradient_clip_val!r}")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}")
        self._tolaria = _State(
            _make_aggregator(aggregator, aggregator_options, seed),
            shared,
            gradient_clip_val,
            gradient_clip_algorithm,
            accumulate_grad_batches,
            bool(log_stats),
            log_prefix,
        )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_tolaria_wrapped", False):
            cls.training_step = _consuming_losses(step)

    # Lightning reads this property; the mixin always optimises manually.
    @property
    def automatic_optimization(self) -> bool:
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise ValueError("MultiSourceMixin steps the optimizer itself; automatic_optimization stays False")

    @property
    def aggregator(self) -> _AggregatorLike:
        """The aggregator every step uses."""
        return self._tolaria.aggregator

    @property
    def gradient_buffer(self) -> GradientBuffer | None:
        """The K x N buffer (built at the first step)."""
        return self._tolaria.buffer

    def multi_source_step(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Backpropagates each loss into its row, and every ``accumulate_grad_batches`` batches aggregates,
        clips and steps. Returns the losses, detached. Called for you when ``training_step`` returns a mapping."""
        state = self._tolaria
        state.stepped = True
        names = state.check_names(losses)
        trainer = self.trainer
        ddp = _ddp_wrapper(trainer)
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise TypeError(f"MultiSourceMixin steps one optimizer; configure_optimizers returned {len(optimizer)}")
        buffer = state.buffer_for(self, len(names))
        if state.pending == 0:
            buffer.zero_grad()
        values = list(losses.values())
        for k, loss in enumerate(values):
            with buffer.source(k):
                self.manual_backward(
                    loss / state.accumulate if state.accumulate > 1 else loss, retain_graph=k + 1 < len(values)
                )
        state.pending += 1
        stats = None
        stepped = state.pending >= state.accumulate or trainer.is_last_batch
        if stepped:
            state.pending = 0
            stats = self._tolaria_update(buffer, optimizer, ddp)
        detached = {name: loss.detach() for name, loss in losses.items()}
        if state.log_stats:
            self._tolaria_log(names, detached, stats)
        return detached

    def _tolaria_update(
        self, buffer: GradientBuffer, optimizer: Any, ddp: nn.parallel.DistributedDataParallel | None
    ) -> AggregationStats | None:
        state = self._tolaria
        if ddp is not None and dist.get_world_size() > 1:
            from tolaria.distributed import DistributedContext, allreduce_gradient_buffer, allreduce_mean_grads

            allreduce_gradient_buffer(buffer, DistributedContext.from_process_group(device=buffer.device))
            allreduce_mean_grads(buffer.unshared_params, dist.get_world_size())
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale, overflow = None, False
        if scaler is not None and scaler.is_enabled():
            scale = float(scaler.get_scale())
            heads = [p.grad for p in buffer.unshared_params if p.grad is not None]
            overflow = unscale_found_inf([*buffer.buffer.unbind(0), *heads], 1.0 / scale)
        stats = None
        if overflow:
            # Not aggregated (a stateful aggregator's state stays clean): the scaler finds the non-finite
            # values in .grad, skips the step and lowers its scale.
            buffer.aggregate(_row_sum)
        else:
            with_stats = state.log_stats and isinstance(state.aggregator, Aggregator)
            result = buffer.aggregate(state.aggregator, return_stats=with_stats)
            stats = result[1] if with_stats else None
            if state.clip_val is not None:
                self.clip_gradients(
                    optimizer, gradient_clip_val=state.clip_val, gradient_clip_algorithm=state.clip_algorithm
                )
            if scale is not None:
                # Lightning's scaler unscales the .grad again before stepping; a power-of-two scale is exact.
                heads = [p.grad for p in buffer.unshared_params if p.grad is not None]
                torch._foreach_mul_([buffer.output, *heads], scale)
        optimizer.step()
        if ddp is not None and ddp.broadcast_buffers and dist.get_world_size() > 1:
            for b in ddp.module.buffers():  # what DDP would broadcast before the next forward
                dist.broadcast(b, src=0)
        self._tolaria_step_schedulers("step")
        return stats

    def _tolaria_log(self, names: tuple[str, ...], losses: dict[str, Tensor], stats: AggregationStats | None) -> None:
        prefix = self._tolaria.log_prefix
        values: dict[str, Tensor] = {f"{prefix}loss/{n}": v.reshape(()) for n, v in losses.items()}
        if stats is not None:
            for k, name in enumerate(names):
                values[f"{prefix}weight/{name}"] = stats.weights[k]
                values[f"{prefix}norm/{name}"] = stats.norms[k]
            values[f"{prefix}conflicts"] = stats.conflicts.to(torch.float32)
        self.log_dict(values, on_step=True, on_epoch=False)

    def _tolaria_step_schedulers(self, interval: str) -> None:
        """Steps the schedulers of ``interval`` as automatic optimisation would (Lightning leaves them to
        manual optimisation's training_step, which here is the mixin's)."""
        trainer = self.trainer
        count = trainer.global_step if interval == "step" else trainer.current_epoch + 1
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval or count % config.frequency:
                continue
            metric = None
            if config.reduce_on_plateau:
                metric = trainer.callback_metrics.get(config.monitor)
                if metric is None:
                    if config.strict:
                        raise MisconfigurationException(
                            f"ReduceLROnPlateau conditioned on metric {config.monitor} which is not available. "
                            f"Available metrics are: {list(trainer.callback_metrics)}"
                        )
                    continue
            self.lr_scheduler_step(config.scheduler, metric)

    # ---- Lightning hooks (call super() when overriding them) ----------------------------------------

    def on_train_start(self) -> None:
        super().on_train_start()
        self._tolaria.pending = 0

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._tolaria_step_schedulers("epoch")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = self._tolaria.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._tolaria.load_state_dict(checkpoint.get(CHECKPOINT_KEY))


def _consuming_losses(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a subclass's ``training_step``: a returned mapping of losses goes through ``multi_source_step``."""

    @functools.wraps(step)
    def training_step(self: MultiSourceMixin, *args: Any, **kwargs: Any) -> Any:
        state = self._tolaria
        if state.depth:  # super().training_step(...) inside an override: the outermost call consumes
            return step(self, *args, **kwargs)
        state.depth, state.stepped = 1, False
        try:
            out = step(self, *args, **kwargs)
        finally:
            state.depth = 0
        if state.stepped or out is None:
            return out
        if isinstance(out, Tensor) and out.requires_grad:
            raise TypeError(
                "training_step returned one loss tensor; MultiSourceMixin needs a mapping of named "
                "losses, e.g. {'task': loss} (or call self.multi_source_step yourself)"
            )
        return self.multi_source_step(out) if isinstance(out, Mapping) else out

    training_step._tolaria_wrapped = True  # type: ignore[attr-defined]
    return training_step
