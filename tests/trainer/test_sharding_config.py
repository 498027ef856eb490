"""``[distributed] sharding`` and ``tolaria train --sharding``: validated, passed through to the config."""

from __future__ import annotations

import argparse

import pytest

import tolaria.distributed
from tolaria.trainer.command import SHARDING_CHOICES, add_arguments, build_config
from tolaria.trainer.config import ConfigError, TrainerConfig


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_default_is_none_and_every_mode_is_accepted():
    assert TrainerConfig().distributed.sharding == "none"
    for mode in ("none", "zero", "fsdp"):
        config = TrainerConfig.from_dict({"distributed": {"sharding": mode}})
        assert config.distributed.sharding == mode
        assert config.to_dict()["distributed"]["sharding"] == mode


def test_an_unknown_mode_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"distributed\.sharding must be 'none' \| 'zero' \| 'fsdp', got 'ddp'"):
        TrainerConfig.from_dict({"distributed": {"sharding": "ddp"}})


def test_the_modes_are_the_distributed_package_s():
    modes = getattr(tolaria.distributed, "SHARDING_MODES", None)
    if modes is None:
        pytest.skip("tolaria.distributed.SHARDING_MODES is not defined yet (the sharded engine lands it)")
    assert tuple(modes) == SHARDING_CHOICES


def test_flag_sets_the_key_over_the_file(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[distributed]\nsharding = "fsdp"\nbucket_mb = 5\n')
    config, _ = build_config(_args("--config", str(toml), "--out", str(tmp_path / "run")))
    assert config.distributed.sharding == "fsdp"
    config, _ = build_config(_args("--config", str(toml), "--sharding", "zero", "--out", str(tmp_path / "run")))
    assert config.distributed.sharding == "zero"
    assert config.distributed.bucket_mb == 5.0  # the rest of the section is kept
    with pytest.raises(SystemExit):
        _args("--sharding", "ddp")
