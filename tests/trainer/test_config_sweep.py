"""Every field of ``TrainerConfig`` given a bad value (issue 18): a wrong type, a negative, a NaN, an
empty string, in Python and in TOML, is a ``ConfigError`` naming the field and what it must be.

The fields are enumerated from the dataclasses, recursively, so a new field or section is swept
without touching this file. A bad value that a field legitimately accepts must be listed in
``ACCEPTED`` with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from tolaria.trainer import Trainer, TrainerConfig
from tolaria.trainer.config import ConfigError

# (dotted key, kind) -> why that bad-looking value is valid there.
ACCEPTED: dict[tuple[str, str], str] = {
    ("seed", "negative"): "torch.manual_seed takes any int in [-2**63, 2**64); a negative seed is a seed",
}


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, type, str, Any]]:
    """(dotted key, owning dataclass, field name, annotation) of every non-section field, recursively."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found.extend(_leaves(tp, f"{prefix}{f.name}."))
        else:
            found.append((f"{prefix}{f.name}", cls, f.name, tp))
    return found


def _takes_strings(tp: Any) -> bool:
    if tp is str:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    if origin in (typing.Union, __import__("types").UnionType):
        return any(_takes_strings(a) for a in typing.get_args(tp))
    return False


def _bad_values(tp: Any) -> dict[str, Any]:
    return {
        "wrong type": 7 if _takes_strings(tp) else "seven",
        "negative": -1,
        "nan": math.nan,
        "empty string": "",
    }


LEAVES = _leaves(TrainerConfig)


def _toml_value(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return json.dumps(value)  # ints and basic strings are the same in TOML


def _assert_names_field_and_range(message: str, key: str) -> None:
    assert re.search(rf"(^|[\s:'\[]){re.escape(key)}\b", message), f"{key!r} not named in: {message}"
    assert re.search(r"\bmust\b", message), f"no valid range or type stated in: {message}"


def test_the_sweep_reaches_every_section():
    sections = {key.split(".")[0] for key, *_ in LEAVES if "." in key}
    assert {"checkpoint", "lr", "profiler", "telemetry", "safety", "distributed"} <= sections
    assert len(LEAVES) >= 50


def test_seed_range_is_torchs():
    for seed in (-(2**63) - 1, 2**63):
        with pytest.raises(ConfigError, match=r"seed must lie in \[-9223372036854775808, 9223372036854775807\]"):
            TrainerConfig(seed=seed)


def test_the_trainer_validates_a_config_assigned_after_construction(tmp_path):
    from .helpers import make_problem

    config = TrainerConfig(device="cpu", run_dir=str(tmp_path))
    config.checkpoint.keep_last = -2
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last must be > 0, got -2"):
        Trainer(*make_problem(), config)
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was built


def _check_rejected(tmp_path: Path, key: str, owner: type, name: str, value: Any) -> None:
    section, _, leaf = key.rpartition(".")
    # Python: the section's own class (as a user builds it), and TrainerConfig from a dict.
    with pytest.raises(ConfigError) as direct:
        owner(**{name: value})
    _assert_names_field_and_range(str(direct.value), key)
    # Python, after construction: a field assigned later is caught by validate() (the Trainer calls it).
    if not owner.__dataclass_params__.frozen:
        config = TrainerConfig()
        setattr(config if not section else getattr(config, section), leaf, value)
        with pytest.raises(ConfigError) as assigned:
            config.validate()
        _assert_names_field_and_range(str(assigned.value), key)
    data = {leaf: value} if not section else {section: {leaf: value}}
    with pytest.raises(ConfigError) as from_dict:
        TrainerConfig.from_dict(data)
    _assert_names_field_and_range(str(from_dict.value), key)
    # TOML: a file with that one value.
    path = tmp_path / "run.toml"
    line = f"{leaf} = {_toml_value(value)}\n"
    path.write_text(line if not section else f"[{section}]\n{line}", encoding="utf-8")
    with pytest.raises(ConfigError) as from_toml:
        TrainerConfig.from_toml(path)
    message = str(from_toml.value)
    assert message.startswith(f"{path}: ")
    _assert_names_field_and_range(message, key)


@pytest.mark.parametrize(("key", "owner", "name", "tp"), LEAVES, ids=[leaf[0] for leaf in LEAVES])
def test_every_bad_value_is_a_config_error_naming_the_field(tmp_path: Path, key, owner, name, tp):
    for kind, value in _bad_values(tp).items():
        if (key, kind) in ACCEPTED:
            section, _, leaf = key.rpartition(".")
            TrainerConfig.from_dict({leaf: value} if not section else {section: {leaf: value}})
            continue
        try:
            _check_rejected(tmp_path, key, owner, name, value)
        except BaseException as exc:
            raise AssertionError(f"{key} given {kind} {value!r}: {exc}") from exc
