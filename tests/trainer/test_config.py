"""TrainerConfig: validation, unknown and legacy keys, TOML, documentation of every default."""

import dataclasses

import pytest

from tolaria.trainer.config import (
    CheckpointConfig,
    ConfigError,
    LRConfig,
    ProfilerConfig,
    SafetyConfig,
    TelemetryConfig,
    TrainerConfig,
)
from tolaria.trainer.tasks import DigitsTaskConfig

SECTIONS = [TrainerConfig, CheckpointConfig, LRConfig, ProfilerConfig, SafetyConfig, TelemetryConfig, DigitsTaskConfig]


def test_defaults_are_valid_and_round_trip():
    config = TrainerConfig()
    assert TrainerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.__name__)
def test_every_field_is_documented(section):
    doc = section.__doc__
    for f in dataclasses.fields(section):
        assert f.name in doc, f"{section.__name__}.{f.name} is not documented in its docstring"


def test_legacy_key_raises_with_valid_keys():
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_dict({"tolaria_agg_per_layer_enabled": True})
    message = str(info.value)
    assert "tolaria_agg_per_layer_enabled" in message
    for key in ("epochs", "max_steps", "aggregator", "control_timeout_s", "checkpoint", "safety"):
        assert key in message


def test_unknown_key_in_a_section_names_the_section():
    with pytest.raises(
        ConfigError, match=r"checkpoint\.snapshot_every.*valid keys in \[checkpoint\].*snapshot_every_steps"
    ):
        TrainerConfig.from_dict({"checkpoint": {"snapshot_every": 3}})


@pytest.mark.parametrize(
    "data, match",
    [
        ({"epochs": 0}, "epochs must be > 0"),
        ({"epochs": 2.5}, "epochs must be int"),
        ({"epochs": True}, "epochs must be int"),
        ({"device": "tpu"}, "device must be"),
        ({"control_timeout_s": -1.0}, "control_timeout_s must be > 0"),
        ({"amp": "fp8"}, "amp must be"),
        ({"lr": {"policy": "exponential"}}, r"lr\.policy must be"),
        ({"telemetry": {"rate_limits": {"x": 0}}}, r"telemetry\.rate_limits"),
        ({"checkpoint": {"keep_last": 0}}, r"checkpoint\.keep_last must be > 0"),
        ({"checkpoint": 3}, r"checkpoint must be a CheckpointConfig \(a table\)"),
        ({"safety": {"emergency_signal": ""}}, "emergency_signal"),
    ],
)
def test_bad_values_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        TrainerConfig.from_dict(data)


def test_ints_are_accepted_for_floats():
    config = TrainerConfig.from_dict({"control_timeout_s": 2, "checkpoint": {"rollback_deadline_s": 1}})
    assert isinstance(config.control_timeout_s, float) and config.control_timeout_s == 2.0
    assert isinstance(config.checkpoint.rollback_deadline_s, float)


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'epochs = 3\naggregator = "mean"\ncontrol_timeout_s = 1.5\n'
        '[aggregator_options]\n\n[lr]\npolicy = "cosine"\nwarmup_steps = 4\n'
        '[telemetry]\nrate_limits = { "safety.step_skipped" = 2.0 }\n'
    )
    config = TrainerConfig.from_toml(path)
    assert config.epochs == 3 and config.aggregator == "mean" and config.control_timeout_s == 1.5
    assert config.lr.policy == "cosine" and config.lr.warmup_steps == 4
    assert config.telemetry.rate_limits == {"safety.step_skipped": 2.0}


def test_toml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("tolaria_agg_per_layer_topk = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown config key tolaria_agg_per_layer_topk"):
        TrainerConfig.from_toml(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("epochs = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        TrainerConfig.from_toml(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        TrainerConfig.from_toml(tmp_path / "missing.toml")


def test_lr_controller_kwargs_pass_only_given_options():
    assert LRConfig().controller_kwargs() == {}
    assert LRConfig(policy="step", step_size=10, gamma=0.5).controller_kwargs() == {"step_size": 10, "gamma": 0.5}


def test_replace_validates_again():
    with pytest.raises(ConfigError):
        TrainerConfig().replace(max_steps=-3)


def test_component_sections_are_the_components_classes():
    # Each component declares its configuration once; the trainer composes it. The [lr] section IS
    # tolaria.lr.LRConfig. The [profiler] section subclasses tolaria.profiler.ProfilerConfig (it only
    # narrows trace_dir to a string and lets the run folder supply it), so the fields and defaults
    # cannot drift apart.
    from tolaria import lr, profiler, trainer

    assert LRConfig is lr.LRConfig is trainer.LRConfig
    assert issubclass(ProfilerConfig, profiler.ProfilerConfig)
    assert ProfilerConfig.__dataclass_fields__.keys() == profiler.ProfilerConfig.__dataclass_fields__.keys()
    own = {name for name in ProfilerConfig.__annotations__}
    assert own == {"trace_dir"}, f"the trainer's ProfilerConfig re-declares {sorted(own)}"
    section = {f.name: f.default for f in dataclasses.fields(ProfilerConfig)}
    runtime = {f.name: f.default for f in dataclasses.fields(profiler.ProfilerConfig)}
    assert section == runtime


def test_lr_policies_match_the_controllers():
    import typing

    from tolaria.lr import POLICIES

    assert typing.get_args(typing.get_type_hints(LRConfig)["policy"]) == POLICIES
