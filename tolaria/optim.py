"""Optimizer rebuilds that keep what the optimizer knows, guarded by a circuit breaker.

When the set of trained parameters changes (a sub-module grafted in or pruned), the optimizer must
be rebuilt. :meth:`OptimizerManager.rebuild` builds a new optimizer of the same class in which:

- every parameter that stays keeps its param group, with **all** of that group's settings (every
  key, custom keys included), and its optimizer state (``exp_avg``, ``momentum_buffer``, ...), the
  very same tensors, matched by parameter identity;
- new parameters join the group the caller chooses (by default a new group with the optimizer's
  defaults);
- removed parameters leave, and their state is dropped.

Groups keep their order and index, even when they lose every parameter, so anything keyed by group
index (an :class:`tolaria.lr.LRController`) stays aligned; new parameters in a new group append one.

If the new optimizer cannot take the old state, the rebuild fails with that error named in its
:class:`RebuildResult` (and in telemetry and the log), and the old optimizer stays in place: it never
falls back to fresh state.

A :class:`CircuitBreaker` (closed → open → half-open) stops rebuild storms: after
``failure_threshold`` consecutive failures it opens and rebuilds are skipped (a failed result that
says so) for ``cooldown_s``; then one trial is let through. A rebuild that succeeds stays
provisional until the next rebuild or :meth:`OptimizerManager.report_success`: a
:meth:`OptimizerManager.report_failure` in between (e.g. the next optimizer step blew up) turns it
into a failure, so rebuild-then-fail churn trips the breaker too.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .telemetry import TelemetryEmitter, emitter_or_default

log = logging.getLogger("tolaria.optim")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class RebuildResult:
    """What one :meth:`OptimizerManager.rebuild` call did.

    ``added``/``removed``/``kept`` count parameters. ``error`` names what went wrong when
    ``success`` is False; ``skipped`` is True when the open circuit breaker refused the rebuild.
    """

    success: bool
    latency_ms: float
    error: str | None
    added: int
    removed: int
    kept: int = 0
    skipped: bool = False
    breaker_state: str = CLOSED


class CircuitBreaker:
    """Counts consecutive failures; opens at ``failure_threshold``, half-opens after ``cooldown_s``.

    - closed: everything allowed; a success resets the count, a failure adds one.
    - open: nothing allowed until ``cooldown_s`` has passed since it opened, then half-open; a
      failure reported while open (see ``OptimizerManager.report_failure``) restarts the cooldown.
    - half-open: a trial is allowed; a success closes the breaker, a failure reopens it (and
      restarts the cooldown).

    ``clock`` returns seconds (monotonic); inject one in tests. ``on_transition(old, new)`` is called
    on every state change.
    """

    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown_s: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[str, str], None] | None = None,
    ):
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int) or failure_threshold < 1:
            raise ValueError(f"failure_threshold must be an int >= 1, got {failure_threshold!r}")
        if not cooldown_s >= 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s!r}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = float(cooldown_s)
        self.clock = clock
        self.on_transition = on_transition
        self.consecutive_failures = 0
        self._state = CLOSED
        self._opened_at = 0.0

    def _move(self, new: str) -> None:
        old, self._state = self._state, new
        if old != new and self.on_transition is not None:
            self.on_transition(old, new)

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (an open breaker half-opens once its cooldown passed)."""
        if self._state == OPEN and self.clock() - self._opened_at >= self.cooldown_s:
            self._move(HALF_OPEN)
        return self._state

    def retry_in_s(self) -> float:
        """Seconds until an open breaker half-opens (0 when not open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - self.clock())

    def allow(self) -> bool:
        """Whether an attempt may go ahead now."""
        return self.state != OPEN

    def record_success(self) -> None:
        self.consecutive_failures = 0
        if self.state != CLOSED:
            self._move(CLOSED)

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        state = self.state
        if state in (HALF_OPEN, OPEN) or self.consecutive_failures >= self.failure_threshold:
            self._opened_at = self.clock()
            self._move(OPEN)


def _named_params(params_or_model: nn.Module | Iterable[Any]) -> list[tuple[str | None, torch.Tensor]]:
    """``(name or None, parameter)`` pairs from a module, tensors, ``(name, tensor)`` pairs or a mapping."""
    if isinstance(params_or_model, nn.Module):
        return [(n, p) for n, p in params_or_model.named_parameters() if p.requires_grad]
    if isinstance(params_or_model, torch.Tensor):
        raise TypeError("rebuild() takes a module or an iterable of parameters, not a single tensor")
    items = params_or_model.items() if isinstance(params_or_model, Mapping) else params_or_model
    out: list[tuple[str | None, torch.Tensor]] = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            out.append((None, item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and torch.is_tensor(item[1]):
            out.append((item[0], item[1]))
        else:
            raise TypeError(f"rebuild() item {i} is {type(item).__name__}; expected a tensor or a (name, tensor) pair")
    return out


def _constructor_kwargs(cls: type, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer's defaults its constructor accepts as keyword arguments."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in params and k != "params"}


class OptimizerManager:
    """Owns the optimizer of a run and rebuilds it when the trained parameters change.

    Args:
        optimizer: the optimizer to manage.
        failure_threshold: consecutive failures that open the circuit breaker.
        cooldown_s: how long an open breaker skips rebuilds before letting a trial through.
        telemetry: emitter for counters (``optim.rebuilds``, ``optim.failures``, ``optim.skips``),
            metrics (``optim.rebuild_latency_ms``, ``optim.breaker_state``) and events.
        clock: monotonic seconds for the breaker; inject a fake one in tests.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        failure_threshold: int = 3,
        cooldown_s: float = 60.0,
        telemetry: TelemetryEmitter | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"OptimizerManager needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._optimizer = optimizer
        self.telemetry = emitter_or_default(telemetry)
        self.breaker = CircuitBreaker(failure_threshold, cooldown_s, clock=clock, on_transition=self._on_transition)
        self.generation = 0  # bumped by every successful rebuild
        self.rebuilds = 0
        self.failures = 0
        self.skips = 0
        self.last_latency_ms: float | None = None
        self._provisional = False  # a successful rebuild not yet confirmed (see module docstring)
        self._lock = threading.RLock()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The live optimizer, not a copy: stepping or editing it changes the managed optimizer.

        A successful :meth:`rebuild` replaces it with a new object, so fetch it again after one
        instead of keeping a reference.
        """
        return self._optimizer

    @property
    def breaker_state(self) -> str:
        return self.breaker.state

    def stats(self) -> dict[str, Any]:
        """Counters as plain data: rebuilds, failures, skips, last latency, breaker state."""
        return {
            "rebuilds": self.rebuilds,
            "failures": self.failures,
            "skips": self.skips,
            "last_latency_ms": self.last_latency_ms,
            "breaker_state": self.breaker.state,
            "consecutive_failures": self.breaker.consecutive_failures,
            "generation": self.generation,
        }

    # ---- breaker bookkeeping -----------------------------------------------------------------

    def _on_transition(self, old: str, new: str) -> None:
        severity = "warning" if new == OPEN else "info"
        message = f"optimizer rebuild circuit breaker {old} -> {new}"
        (log.warning if new == OPEN else log.info)(message)
        self.telemetry.event("optim.breaker", severity=severity, message=message, previous=old, state=new)
        self.telemetry.metric("optim.breaker_state", new)

    def _confirm_provisional(self) -> None:
        if self._provisional:
            self._provisional = False
            self.breaker.record_success()

    def report_success(self) -> None:
        """Confirms the last rebuild (e.g. after the next optimizer step went fine)."""
        with self._lock:
            self._provisional = False
            self.breaker.record_success()

    def report_failure(self, error: BaseException | str | None = None) -> None:
        """Counts a failure that happened after a rebuild (e.g. the step that followed it).

        It turns a provisional successful rebuild into a failure for the circuit breaker, so rebuilds
        that "succeed" and then break training still open it.
        """
        with self._lock:
            self._provisional = False
            detail = _describe(error) if error is not None else "no detail given"
            message = f"failure reported after optimizer rebuild (generation {self.generation}): {detail}"
            log.error(message)
            self._record_failure(message, "reported")

    # ---- rebuild -----------------------------------------------------------------------------

    def rebuild(
        self,
        params_or_model: nn.Module | Iterable[Any],
        *,
        new_param_group: int | Mapping[str, Any] | None = None,
    ) -> RebuildResult:
        """Rebuilds the optimizer for a new set of parameters (see the module docstring).

        Args:
            params_or_model: a module (its parameters that require grad), or an iterable of
                parameters, of ``(name, parameter)`` pairs, or a ``{name: parameter}`` mapping.
                Names are needed for new parameters only if the optimizer was built with names.
            new_param_group: where new parameters go: ``None`` (a new group with the optimizer's
                defaults), an ``int`` (the index of an existing group, whose settings they take), or
                a mapping of settings for a new group (over the optimizer's defaults).

        Returns a :class:`RebuildResult`. Building or loading failures are returned (and counted,
        logged, emitted), never raised; malformed arguments (not parameters, duplicates, no
        parameters left, a bad group index) raise ``TypeError``/``ValueError``.
        """
        with self._lock:
            plan = self._plan(params_or_model, new_param_group)
            self._confirm_provisional()  # the previous rebuild lasted until this one
            if not self.breaker.allow():
                return self._skip(plan)
            start = time.perf_counter()
            try:
                new_optimizer = self._build(plan)
            except Exception as exc:  # returned as a failed result, counted and logged: never hidden
                return self._fail(plan, exc, (time.perf_counter() - start) * 1e3)
            latency_ms = (time.perf_counter() - start) * 1e3
            self._optimizer = new_optimizer
            self._provisional = True
            self.generation += 1
            self.rebuilds += 1
            self.last_latency_ms = latency_ms
            self.telemetry.count("optim.rebuilds")
            self.telemetry.metric("optim.rebuild_latency_ms", latency_ms)
            self.telemetry.event(
                "optim.rebuild",
                message="optimizer rebuilt",
                added=len(plan.added),
                removed=len(plan.removed),
                kept=plan.kept,
                generation=self.generation,
                latency_ms=latency_ms,
                breaker_state=self.breaker.state,
            )
            return RebuildResult(
                True, latency_ms, None, len(plan.added), len(plan.removed), plan.kept, breaker_state=self.breaker.state
            )

    def _plan(self, params_or_model: nn.Module | Iterable[Any], new_param_group: Any) -> _Plan:
        old = self._optimizer
        named = _named_params(params_or_model)
        if not named:
            raise ValueError("rebuild() got no parameters; an optimizer needs at least one")
        seen: set[int] = set()
        for name, p in named:
            if id(p) in seen:
                raise ValueError(f"rebuild() got parameter {name or tuple(p.shape)} more than once")
            seen.add(id(p))
        uses_names = any("param_names" in g for g in old.param_groups)
        groups: list[dict[str, Any]] = []
        kept = 0
        old_ids: set[int] = set()
        removed: list[torch.Tensor] = []
        for group in old.param_groups:
            names = group.get("param_names", [None] * len(group["params"]))
            settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            params, kept_names = [], []
            for name, p in zip(names, group["params"]):
                old_ids.add(id(p))
                if id(p) in seen:
                    params.append(p)
                    kept_names.append(name)
                else:
                    removed.append(p)
            kept += len(params)
            groups.append({"settings": settings, "params": params, "names": kept_names})
        added = [(n, p) for n, p in named if id(p) not in old_ids]
        if uses_names and any(n is None for n, _ in added):
            raise ValueError(
                "the optimizer was built with parameter names, so new parameters need names: pass a module, "
                "(name, parameter) pairs or a {name: parameter} mapping"
            )
        target: int | None = None
        if added:
            if new_param_group is None or isinstance(new_param_group, Mapping):
                overrides = dict(new_param_group or {})
                if "params" in overrides or "param_names" in overrides:
                    raise ValueError("new_param_group settings must not contain 'params' or 'param_names'")
                groups.append({"settings": {**old.defaults, **overrides}, "params": [], "names": []})
                target = len(groups) - 1
            elif isinstance(new_param_group, int) and not isinstance(new_param_group, bool):
                if not 0 <= new_param_group < len(old.param_groups):
                    raise ValueError(
                        f"new_param_group={new_param_group} is not a group index; the optimizer has "
                        f"{len(old.param_groups)} groups"
                    )
                target = new_param_group
            else:
                raise TypeError(
                    f"new_param_group must be None, an int or a mapping, got {type(new_param_group).__name__}"
                )
            groups[target]["params"].extend(p for _, p in added)
            groups[target]["names"].extend(n for n, _ in added)
        return _Plan(groups=groups, added=[p for _, p in added], removed=removed, kept=kept, uses_names=uses_names)

    def _build(self, plan: _Plan) -> torch.optim.Optimizer:
        old = self._optimizer
        cls = type(old)
        param_groups = []
        for g in plan.groups:
            group = {**g["settings"], "params": list(g["params"])}
            if plan.uses_names:
                group["param_names"] = list(g["names"])
            param_groups.append(group)
        new = cls(param_groups, **_constructor_kwargs(cls, old.defaults))
        new.defaults.update(old.defaults)

        # Hand the kept state over through load_state_dict: it validates the layout, casts state to
        # each parameter's dtype/device (a no-op that keeps the same tensors when they already match)
        # and runs the optimizer's own load hooks. A failure here fails the rebuild.
        index = {}
        for g in new.param_groups:
            for p in g["params"]:
                index[id(p)] = len(index)
        state = {index[id(p)]: old.state[p] for g in plan.groups for p in g["params"] if p in old.state}
        saved_groups = []
        for g in new.param_groups:
            saved = {k: v for k, v in g.items() if k != "params"}
            saved["params"] = [index[id(p)] for p in g["params"]]
            saved_groups.append(saved)
        try:
            new.load_state_dict({"state": state, "param_groups": saved_groups})
        except Exception as exc:
            raise RuntimeError(
                f"optimizer state failed to load into the rebuilt {cls.__name__}: {_describe(exc)}"
            ) from exc
        # load_state_dict deep-copies group settings; put back the very objects the groups had.
        for built, saved in zip(new.param_groups, param_groups):
            for key, value in saved.items():
                if key != "params":
                    built[key] = value
        return new

    def _record_failure(self, message: str, source: str) -> None:
        """One failure, from a rebuild or reported after one: counted, fed to the breaker, an event."""
        self.failures += 1
        self.breaker.record_failure()
        self.telemetry.count("optim.failures")
        self.telemetry.event(
            "optim.failure",
            severity="error",
            message=message,
            source=source,
            breaker_state=self.breaker.state,
            consecutive_failures=self.breaker.consecutive_failures,
        )

    def _fail(self, plan: _Plan, exc: BaseException, latency_ms: float) -> RebuildResult:
        self.last_latency_ms = latency_ms
        error = f"optimizer rebuild failed: {_describe(exc)}"
        self.telemetry.metric("optim.rebuild_latency_ms", latency_ms)
        self._record_failure(error, "rebuild")
        log.error("%s (old optimizer kept; breaker %s)", error, self.breaker.state)
        return RebuildResult(
            False, latency_ms, error, len(plan.added), len(plan.removed), plan.kept, breaker_state=self.breaker.state
        )

    def _skip(self, plan: _Plan) -> RebuildResult:
        self.skips += 1
        error = (
            f"rebuild skipped: circuit breaker open after {self.breaker.consecutive_failures} consecutive failures; "
            f"retry in {self.breaker.retry_in_s():.1f}s"
        )
        log.warning(error)
        self.telemetry.count("optim.skips")
        self.telemetry.event("optim.skip", severity="warning", message=error, breaker_state=OPEN)
        return RebuildResult(
            False, 0.0, error, len(plan.added), len(plan.removed), plan.kept, skipped=True, breaker_state=OPEN
        )


@dataclass
class _Plan:
    groups: list[dict[str, Any]]  # per new group: settings, params, names
    added: list[torch.Tensor]
    removed: list[torch.Tensor]
    kept: int
    uses_names: bool


def _describe(error: BaseException | str) -> str:
    return error if isinstance(error, str) else f"{type(error).__name__}: {error}"


__all__ = ["CLOSED", "OPEN", "HALF_OPEN", "CircuitBreaker", "OptimizerManager", "RebuildResult"]
