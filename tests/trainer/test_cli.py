"""`tolaria train` and `tolaria report` end to end, fault demos included."""

import json
import re

import pytest
from matplotlib import image

from tolaria.cli import main

SMALL = """
epochs = {epochs}
control_timeout_s = 0.3
[task]
train_pairs = 1280
test_pairs = 500
hidden = 32
"""


def small_config(tmp_path, epochs=2):
    path = tmp_path / "small.toml"
    path.write_text(SMALL.format(epochs=epochs))
    return str(path)


def end_record(run_dir):
    lines = (run_dir / "telemetry.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"train.end"' in line][-1]


def test_train_then_report(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--max-steps", "25", "--out", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "accuracy/left" in out and "accuracy/right" in out and "conflict rate" in out and "time" in out
    end = end_record(run_dir)
    assert end["status"] == "max_steps" and end["steps"] == 25
    assert end["metrics"]["accuracy/left"] > 0.2  # well above chance (0.1) after 25 steps
    assert main(["report", str(run_dir)]) == 0
    written = capsys.readouterr().out
    for name in ("losses.png", "lr.png", "conflicts.png", "cosine.png"):
        path = run_dir / "report" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        pixels = image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200, name
        assert pixels.std() > 0.01, f"{name} is blank"
        assert str(path) in written


def test_report_of_a_single_source_run_skips_with_reasons(tmp_path, capsys):
    run_dir = tmp_path / "single"
    run_dir.mkdir()
    lines = [
        {"type": "metric", "kind": "train.loss", "value": 1.0, "step": 1, "source": "loss"},
        {"type": "metric", "kind": "train.loss", "value": 0.5, "step": 2, "source": "loss"},
        {"type": "metric", "kind": "train.lr", "value": 0.1, "step": 1},
    ]
    (run_dir / "telemetry.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["report", str(run_dir), "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "skipped conflicts.png: no gradient.conflict_rate records" in out
    assert "skipped cosine.png" in out
    assert (tmp_path / "plots" / "losses.png").exists()


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no telemetry" in capsys.readouterr().err
    (tmp_path / "telemetry.jsonl").write_text('{"kind": "a"}\nnot json\n')
    assert main(["report", str(tmp_path)]) == 2
    assert "telemetry.jsonl:2 is not valid JSON" in capsys.readouterr().err


def test_inject_nan_rolls_back(tmp_path, capsys):
    run_dir = tmp_path / "nan"
    assert (
        main(
            [
                "train",
                "--config",
                small_config(tmp_path),
                "--out",
                str(run_dir),
                "--inject-fault",
                "nan",
                "--no-progress",
            ]
        )
        == 0
    )
    end = end_record(run_dir)
    assert end["status"] == "completed" and end["skipped_steps"] == 3 and end["rollbacks"] == 1


@pytest.mark.timeout(60)
def test_inject_hang_policy_times_out_and_recovers(tmp_path, capsys):
    run_dir = tmp_path / "hang"
    assert (
        main(
            [
                "train",
                "--config",
                small_config(tmp_path, epochs=3),
                "--out",
                str(run_dir),
                "--inject-fault",
                "hang-policy",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "control failures          | 1" in out
    assert end_record(run_dir)["status"] == "completed"


def test_bad_flags_and_config(tmp_path, capsys):
    assert main(["train", "--epochs", "0", "--out", str(tmp_path / "a")]) == 2
    assert "epochs must be > 0" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("tolaria_agg_per_layer_enabled = true\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key tolaria_agg_per_layer_enabled" in err and "valid keys are" in err
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "has no checkpoints folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--inject-fault", "segfault"])


@pytest.mark.parametrize(
    "aggregator,message",
    [
        ("krum", "the default task has 2 gradient sources .*needs at least 3 sources"),
        ("trimmed_mean", "the default task has 2 gradient sources .*needs at least 3 gradient sources"),
        ("weighted", "bad options .*weights"),
    ],
)
def test_an_aggregator_the_task_cannot_use_is_a_clear_error(tmp_path, capsys, aggregator, message):
    assert main(["train", "--aggregator", aggregator, "--max-steps", "2", "--out", str(tmp_path / "run")]) == 2
    assert re.search(message, capsys.readouterr().err)
