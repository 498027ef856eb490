"""Argument and configuration checks shared by every Tolaria module.

Two kinds of helpers live here, both free of any other Tolaria import (a primitive, importable from
every layer):

- Value checks (:func:`check_int`, :func:`check_finite`, :func:`check_bound`,
  :func:`check_interval`, :func:`check_nonempty`, :func:`check_timeout`,
  :func:`check_timestamp_ms`). Each caller keeps its own wording: the error class and the name
  prefix are arguments, so a message a user (or a test) matches on stays the same wherever the check
  moved from.
- The configuration-section machinery (:class:`Section`, :class:`ConfigError`): type checks against
  the dataclass annotations, ``from_dict`` that names the valid keys on an unknown one, ``to_dict``.
  A component declares its own configuration dataclass with it (``tolaria.lr.LRConfig``), and
  ``tolaria.trainer.config.TrainerConfig`` composes those sections. :func:`section_from_dict` and
  :func:`check_section_types` apply the same rules to any dataclass, ``Section`` or not.
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

__all__ = [
    "ConfigError",
    "Section",
    "check_bound",
    "check_finite",
    "check_int",
    "check_interval",
    "check_nonempty",
    "check_section_types",
    "check_timeout",
    "check_timestamp_ms",
    "section_from_dict",
]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and what was expected."""


# ---- value checks ----------------------------------------------------------------------------


def check_int(
    name: str, value: Any, minimum: int, *, error: type[Exception] = ValueError, range_message: bool = True
) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``, else ``error``.

    A non-int reads ``"{name} must be an int >= {minimum}, got {value!r}"``. An int below
    ``minimum`` reads ``"{name} must be >= {minimum}, got {value}"``, or the non-int wording when
    ``range_message`` is False (callers that always said it that way).
    """
    if isinstance(value, bool) or not isinstance(value, int) or (value < minimum and not range_message):
        raise error(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise error(f"{name} must be >= {minimum}, got {value}")
    return value


def check_finite(name: str, value: Any, *, error: type[Exception] = ValueError) -> float:
    """``value`` as a float if it is a finite real number (not a bool), else ``error``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_bound(
    where: str, name: str, value: float | int | None, *, allow_zero: bool = False, error: type[Exception] = ConfigError
) -> None:
    """Raises ``error`` unless ``value`` is None, > 0, or 0 with ``allow_zero`` (type already checked).

    ``where`` is the section prefix of the key (``"checkpoint."``), so the message names the key as
    the configuration spells it.
    """
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise error(f"{where}{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_interval(
    where: str,
    name: str,
    value: float | int | None,
    low: float | int,
    high: float | int,
    *,
    low_open: bool = False,
    error: type[Exception] = ConfigError,
) -> None:
    """Raises ``error`` unless ``value`` is None or lies in ``[low, high]`` (``(low, high]`` with
    ``low_open``); the message states the interval (type already checked, as for :func:`check_bound`)."""
    if value is None:
        return
    if value < low or (value == low and low_open) or value > high:
        raise error(f"{where}{name} must lie in {'(' if low_open else '['}{low}, {high}], got {value}")


def check_nonempty(
    where: str, name: str, value: str | None, what: str, *, error: type[Exception] = ConfigError
) -> None:
    """Raises ``error`` if ``value`` is an empty string (None, "not given", is left to the caller)."""
    if value is not None and not value:
        raise error(f"{where}{name} must be a non-empty {what} or omitted, got ''")


def check_timeout(timeout_s: float | None) -> float | None:
    """A wait's ``timeout_s``: None or infinity (no limit: None), else a number of seconds >= 0."""
    if timeout_s is None:
        return None
    t = float(timeout_s)
    if math.isnan(t) or t < 0:
        raise ValueError(f"timeout_s must be a non-negative number of seconds or None, got {timeout_s!r}")
    return None if math.isinf(t) else t


def check_timestamp_ms(monotonic_ms: float | None) -> float:
    """A signal's ``monotonic_ms``: now (``time.monotonic``, ms) when None, else a finite time >= 0."""
    if monotonic_ms is None:
        return time.monotonic() * 1e3
    t = float(monotonic_ms)
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"monotonic_ms must be a finite, non-negative time in milliseconds, got {monotonic_ms!r}")
    return t


# ---- configuration sections ------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"table of {_type_name(k)} -> {_type_name(v)}"
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (the small set of types configs use)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        return isinstance(value, Mapping) and all(_matches(k, key_tp) and _matches(v, val_tp) for k, v in value.items())
    if origin is tuple:  # tuple[X, ...]: a TOML array (a list) of X
        (item_tp, _) = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_matches(item, item_tp) for item in value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    raise TypeError(f"config annotation {tp!r} is not supported by the validator")


def _coerce(value: Any, tp: Any) -> Any:
    """Ints are accepted where floats are expected (TOML writes ``2`` for 2.0); dicts are copied."""
    floats = tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp))
    if floats and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def check_section_types(section: Any, where: str) -> None:
    """Checks every field of the dataclass instance ``section`` against its annotation.

    Ints given for floats become floats and mappings are copied (set with ``object.__setattr__``,
    so frozen dataclasses work too); a nested dataclass field must hold an instance of its class.
    """
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        tp = hints[f.name]
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise ConfigError(f"{where}{f.name} must be a {tp.__name__} (a table), got {type(value).__name__}")
            continue
        if not _matches(value, tp):
            raise ConfigError(f"{where}{f.name} must be {_type_name(tp)}, got {value!r}")
        object.__setattr__(section, f.name, _coerce(value, tp))


def section_from_dict(cls: type, data: Mapping[str, Any], *, where: str = "") -> Any:
    """Builds the dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError` listing valid ones.

    Nested dataclass fields given as mappings are built the same way, with ``where`` extended by
    the field name so errors name the full key (``checkpoint.keep_last``).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a table, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(where + k for k in unknown)}; valid keys{' in [' + where.rstrip('.') + ']' if where else ''} "
            f"are: {', '.join(valid)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            value = section_from_dict(tp, value, where=f"{where}{key}.")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if where and not str(exc).startswith(where):
            raise ConfigError(f"{where}{exc}") from None
        raise


class Section:
    """Shared machinery of every config dataclass: type checks, ``from_dict``, ``to_dict``."""

    def _check_types(self, where: str) -> None:
        check_section_types(self, where)

    def validate(self) -> None:
        """Checks every value again, nested sections first: a config changed after it was built
        (``config.epochs = -1``) fails here, naming the key, rather than inside a run."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Section):
                value.validate()
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = ""):
        """Builds the section from a mapping; unknown keys raise :class:`ConfigError` listing valid ones."""
        return section_from_dict(cls, data, where=where)

    def to_dict(self) -> dict[str, Any]:
        """The section as plain data (TOML/JSON-ready)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]
