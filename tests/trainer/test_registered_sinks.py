"""Registered telemetry sinks (tolaria/registry.py SINKS, ``[telemetry] sinks``): the CSV metrics sink,
and a sink added with one registry line reaching a training run."""

from __future__ import annotations

import csv
import math

import pytest

from tolaria import registry
from tolaria.csv_sink import COLUMNS, CsvMetricsSink
from tolaria.trainer import TelemetryConfig, Trainer, TrainerConfig
from tolaria.trainer.config import ConfigError

from .helpers import make_problem

SEEN: list[dict] = []


class ProbeSink:
    """A sink defined outside the package, registered by one line in the test."""

    @classmethod
    def for_run(cls, run_dir, rank):
        return cls()

    def write(self, records):
        SEEN.extend(records)

    def close(self):
        SEEN.append({"kind": "probe.closed"})


def _fit(tmp_path, sinks):
    model, optimizer, data, loss_fn = make_problem()
    telemetry = TelemetryConfig(sinks=sinks, log_every_steps=1)
    config = TrainerConfig(run_dir=str(tmp_path), epochs=1, device="cpu", telemetry=telemetry)
    return Trainer(model, optimizer, data, loss_fn, config).fit()


def test_the_csv_sink_writes_scalar_metrics_only(tmp_path):
    sink = CsvMetricsSink(tmp_path / "m.csv")
    sink.write(
        [
            {"type": "metric", "kind": "train.loss", "source": "a", "value": 0.5, "time": 1.0, "step": 3},
            {"type": "metric", "kind": "train.cosine", "value": [[1.0, 0.0], [0.0, 1.0]], "time": 1.0},
            {"type": "metric", "kind": "train.grad_norm", "value": math.nan, "time": 2.0, "step": 4},
            {"type": "event", "kind": "train.epoch", "message": "done", "time": 3.0},
        ]
    )
    sink.close()
    rows = list(csv.reader((tmp_path / "m.csv").open()))
    assert rows == [
        COLUMNS,
        ["1.0", "3", "", "", "train.loss/a", "0.5"],
        ["2.0", "4", "", "", "train.grad_norm", "nan"],
    ]
    CsvMetricsSink(tmp_path / "m.csv").close()  # reopened: no second header
    assert sum(row == COLUMNS for row in csv.reader((tmp_path / "m.csv").open())) == 1


def test_a_run_with_the_csv_sink_writes_metrics_csv(tmp_path):
    summary = _fit(tmp_path, ("csv",))
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    losses = [r for r in rows if r["name"].startswith("train.loss")]
    assert len({r["step"] for r in losses}) == summary.steps and all(math.isfinite(float(r["value"])) for r in losses)


def test_a_sink_registered_with_one_line_reaches_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.SINKS, "probe", f"{__name__}:ProbeSink")
    SEEN.clear()
    _fit(tmp_path, ("probe",))
    assert any(r.get("kind") == "train.end" for r in SEEN) and SEEN[-1] == {"kind": "probe.closed"}


@pytest.mark.parametrize("sinks", [("nope",), "csv", (3,), ("",)])
def test_unknown_or_malformed_sink_names_are_config_errors(sinks):
    with pytest.raises(ConfigError, match="telemetry.sinks"):
        TelemetryConfig(sinks=sinks)


def test_sinks_read_from_toml_as_a_list(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[telemetry]\nsinks = ["csv"]\n')
    assert TrainerConfig.from_toml(path).telemetry.sinks == ("csv",)
