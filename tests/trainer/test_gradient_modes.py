"""The trainer's memory modes and aggregation levels: config keys, the gradient stage (same update and
stats in float64 as the buffer mode; the features level's norm and clipping), and `tolaria train
--mode low_memory` / `--aggregation-level features` end to end."""

from __future__ import annotations

import contextlib
import json
import typing

import pytest
import torch
from torch import nn

from tolaria.aggregation import AGGREGATION_LEVELS, BUFFER_MODES, LowMemoryGradientBuffer, Mean
from tolaria.cli import main
from tolaria.telemetry import TelemetryEmitter
from tolaria.trainer.config import ConfigError, TrainerConfig
from tolaria.trainer.gradient import GradientStage, build_training_aggregator
from tolaria.trainer.gradient_modes import GradientModes


class _Wide(nn.Module):
    """Parameters outweigh activations: the low-memory mode accepts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.heads = nn.ModuleDict({name: nn.Linear(64, 1) for name in ("a", "b", "c")})

    def forward(self, x):
        z = self.trunk(x)
        return {name: head(z).squeeze(-1) for name, head in self.heads.items()}


def _losses(outputs, ys):
    return {name: ((out - y) ** 2).mean() * (1 + i) for i, ((name, out), y) in enumerate(zip(outputs.items(), ys))}


class _Events:
    def __init__(self):
        self.records = []

    def write(self, records):
        self.records.extend(records)

    def close(self):
        pass


def _steps(mode: str, level: str = "params", max_grad_norm=None, steps: int = 2):
    model = _Wide().double()
    sink = _Events()
    telemetry = TelemetryEmitter([sink])
    stage = GradientStage(
        model,
        build_training_aggregator("upgrad"),
        shared=model.trunk,
        mode=mode,
        level=level,
        max_grad_norm=max_grad_norm,
        telemetry=telemetry,
    )
    gen = torch.Generator().manual_seed(3)
    results = []
    for _ in range(steps):
        x, ys = torch.randn(4, 32, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen).double()
        stage.zero_grad()
        with stage.forward_context():
            outputs = model(x)
        stats = stage.backward(_losses(outputs, ys))
        results.append((stats, [p.grad.clone() for p in model.parameters()]))
    telemetry.close()
    return results, stage, sink.records


def test_the_config_keys_and_their_errors():
    hints = typing.get_type_hints(TrainerConfig)  # the config names the buffer's modes and levels, not a copy
    assert typing.get_args(hints["aggregation_mode"]) == BUFFER_MODES
    assert typing.get_args(hints["aggregation_level"]) == AGGREGATION_LEVELS
    for key, valid in (("aggregation_mode", BUFFER_MODES), ("aggregation_level", AGGREGATION_LEVELS)):
        for value in valid:
            assert getattr(TrainerConfig.from_dict({key: value}), key) == value
        with pytest.raises(ConfigError, match=" \\| ".join(f"'{v}'" for v in valid)):
            TrainerConfig.from_dict({key: "bogus"})
    with pytest.raises(ConfigError, match='applies to aggregation_level = "params" only'):
        TrainerConfig(aggregation_mode="low_memory", aggregation_level="features")
    model = _Wide()
    with pytest.raises(ValueError, match="use aggregation_mode='buffer'"):
        GradientStage(model, build_training_aggregator("excess_mtl"), shared=model.trunk, mode="low_memory")
    with pytest.raises(ValueError, match="single process only"):
        GradientModes("low_memory", "params", aggregator=Mean(), shared=None, distributed=True)
    with pytest.raises(ValueError, match="needs the shared trunk as a module"):
        GradientStage(model, build_training_aggregator("mean"), shared=list(model.trunk.parameters()), level="features")


def test_the_low_memory_stage_gives_the_buffer_stage_s_update_and_stats():
    reference, _, _ = _steps("buffer")
    low, stage, records = _steps("low_memory")
    assert isinstance(stage.buffer, LowMemoryGradientBuffer)
    (event,) = [r for r in records if r.get("kind") == "gradient.memory_mode"]
    assert event["mode"] == "low_memory" and event["low_memory_bytes"] < event["buffer_bytes"]
    assert event["activation_bytes"] > 0 and "saves memory" in event["message"]
    for (ref_stats, ref_grads), (stats, grads) in zip(reference, low):
        for a, b in zip(ref_grads, grads):
            assert torch.allclose(a, b, rtol=0, atol=1e-13)
        assert ref_stats.weights == pytest.approx(stats.weights, rel=1e-12)
        assert ref_stats.grad_norm == pytest.approx(stats.grad_norm, rel=1e-12)
        assert sum(ref_stats.cosine, ()) == pytest.approx(sum(stats.cosine, ()), rel=1e-12)


def test_the_features_level_reports_the_update_s_own_norm_and_clips_it():
    ((stats, grads),), _, _ = _steps("buffer", "features", steps=1)
    norm = torch.cat([g.reshape(-1) for g in grads]).norm().item()
    assert stats.grad_norm == pytest.approx(norm, rel=1e-12)  # not w^T G w of the features' Gram
    ((_, clipped),), _, _ = _steps("buffer", "features", max_grad_norm=norm / 4, steps=1)
    assert torch.cat([g.reshape(-1) for g in clipped]).norm().item() == pytest.approx(norm / 4, rel=1e-5)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "telemetry.jsonl").read_text().splitlines()]


SMALL = """
control_timeout_s = 0.3
[task]
train_pairs = 640
test_pairs = 200
hidden = 32
[telemetry]
log_every_steps = 1
"""


@pytest.mark.parametrize(
    "flags", [["--mode", "low_memory"], ["--aggregation-level", "features", "--aggregator", "mgda"]], ids=str
)
def test_tolaria_train_with_the_new_flags(tmp_path, capsys, flags):
    config = tmp_path / "small.toml"
    config.write_text(SMALL)
    run_dir = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="declined") if "low_memory" in flags else contextlib.nullcontext():
        code = main(
            ["train", "--config", str(config), "--max-steps", "8", "--no-progress", "--out", str(run_dir), *flags]
        )
    assert code == 0, capsys.readouterr()
    records = _records(run_dir)
    end = [r for r in records if r.get("kind") == "train.end"][-1]
    assert end["status"] == "max_steps" and end["steps"] == 8
    if "low_memory" in flags:
        # hidden = 32: the 128-pixel input batch outweighs the 5k parameters, so the mode declines and says why
        (event,) = [r for r in records if r.get("kind") == "gradient.memory_mode"]
        assert event["severity"] == "warning" and event["mode"] == "buffer"
        assert event["low_memory_bytes"] >= event["buffer_bytes"] and "declined" in event["message"]
    else:
        weights = [r for r in records if r.get("kind") == "gradient.weight"]
        assert weights and all(0 <= r["value"] <= 1 for r in weights)  # MGDA-UB: a convex combination
