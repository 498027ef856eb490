"""`tolaria compare` end to end (two aggregators, two seeds, a few steps), the task zoo and the
peak-memory measurement."""

import json

import pytest
import torch
from matplotlib import image

from tolaria.cli import main
from tolaria.trainer.compare import RunResult, conflict_stats, differences_from_mean
from tolaria.trainer.peak_memory import measure_peak_memory
from tolaria.trainer.task_zoo import ATTRIBUTE_HEADS, TASK_NAMES, build_task, load_digit_attributes
from tolaria.trainer.tasks import DigitsTaskConfig

SMALL = """
[task]
hidden = 16
batch_size = 512
"""


def test_compare_end_to_end(tmp_path, capsys):
    config = tmp_path / "small.toml"
    config.write_text(SMALL)
    out = tmp_path / "cmp"
    argv = ["compare", "--task", "digit-attributes", "--aggregators", "upgrad,mean", "--seeds", "2"]
    argv += ["--epochs", "2", "--max-steps", "5", "--out", str(out), "--config", str(config)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = next(line for line in lines if line.startswith("aggregator"))
    for column in (*ATTRIBUTE_HEADS, "step ms", "peak MB", "conflict steps", "min cos"):
        assert column in header, column
    rows = {line.split("|")[0].strip(): line for line in lines if line.startswith(("upgrad ", "mean "))}
    assert set(rows) == {"upgrad", "mean"}
    assert "±" in rows["upgrad"]

    data = json.loads((out / "compare.json").read_text())
    runs = {(r["aggregator"], r["seed"]): r for r in data["runs"]}
    assert set(runs) == {(a, s) for a in ("upgrad", "mean") for s in (0, 1)}
    for run in runs.values():
        assert run["status"] == "max_steps" and run["steps"] == 5
        # 1348 training digits in batches of 512: 3 steps per epoch, so one held-out evaluation
        # at step 3 and one at the end (step 5), which is the final metric
        assert sorted(run["evals"]["accuracy/digit"]) == ["3", "5"]
        assert run["metrics"]["accuracy/digit"] == run["evals"]["accuracy/digit"]["5"]
        assert 0 <= run["conflict_steps"] <= 1 and 0 <= run["negative_pairs"] <= run["conflict_steps"]
        assert -1 <= run["min_cosine"] <= 1
        assert run["step_ms"] > 0
    # One seed, one start: both aggregators see the same first batch with the same model.
    for seed in (0, 1):
        first = [runs[(a, seed)]["losses"]["digit"]["1"] for a in ("upgrad", "mean")]
        assert first[0] == first[1]
    # Different seeds: different splits and initialisations.
    assert runs[("mean", 0)]["losses"]["digit"]["1"] != runs[("mean", 1)]["losses"]["digit"]["1"]
    # Different aggregators: different updates after the first step.
    assert runs[("mean", 0)]["losses"]["digit"]["5"] != runs[("upgrad", 0)]["losses"]["digit"]["5"]
    assert data["peak_memory_bytes"]["mean"] > 0

    pixels = image.imread(out / "compare.png")
    assert pixels.ndim == 3 and pixels.shape[1] > 800 and pixels.std() > 0.01
    assert (out / "runs" / "mean-seed1" / "telemetry.jsonl").exists()

    # The same folder again: refused, the earlier runs are kept.
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_compare_rejects_bad_arguments(tmp_path, capsys):
    assert main(["compare", "--aggregators", "mean,nope", "--out", str(tmp_path)]) == 2
    assert "unknown aggregator 'nope'" in capsys.readouterr().err
    assert main(["compare", "--aggregators", "mean,mean", "--out", str(tmp_path)]) == 2
    assert "twice" in capsys.readouterr().err


def test_conflict_stats_counts_steps_with_a_negative_pair():
    def cos(step, c01, c02, c12):
        return {"kind": "gradient.cosine", "step": step, "value": [[1, c01, c02], [c01, 1, c12], [c02, c12, 1]]}

    records = [cos(1, 0.5, 0.1, 0.2), cos(2, -0.1, 0.3, -0.2), cos(3, 0.2, 0.2, -0.01), cos(4, 0.1, 0.1, 0.1)]
    records.append(cos(4, 0.1, -0.3, 0.1))  # step 4 run again after a rollback: the later record counts
    steps, pairs, smallest = conflict_stats(records)
    assert steps == pytest.approx(3 / 4)
    assert pairs == pytest.approx((0 + 2 / 3 + 1 / 3 + 1 / 3) / 4)
    assert smallest == pytest.approx((0.1 - 0.2 - 0.01 - 0.3) / 4)


def test_differences_from_mean_reports_only_clear_ones():
    def run(agg, seed, acc):
        return RunResult(agg, seed, "completed", 10, {"accuracy/a": acc}, 1.0, 0.5, 0.2, -0.1)

    results = [run("mean", 0, 0.80), run("mean", 1, 0.82), run("mean", 2, 0.81)]
    results += [run("mgda", 0, 0.90), run("mgda", 1, 0.91), run("mgda", 2, 0.92)]  # clearly better
    results += [run("pcgrad", 0, 0.79), run("pcgrad", 1, 0.83), run("pcgrad", 2, 0.815)]  # within the noise
    lines = differences_from_mean(results)
    assert len(lines) == 1 and lines[0].startswith("mgda vs mean, accuracy/a: +0.1000")


def test_digit_attribute_labels_follow_the_digit():
    cfg = DigitsTaskConfig(seed=3)
    (x, y), (x_test, y_test) = load_digit_attributes(cfg, noisy=True)
    assert len(x) + len(x_test) == 1797 and y.shape[1] == 5
    labels = torch.cat([y, y_test])
    digit = labels[:, 0]
    assert torch.equal(labels[:, 1], digit % 2)
    assert torch.equal(labels[:, 2], (digit >= 5).long())
    assert torch.equal(labels[:, 3], sum((digit == p).long() for p in (2, 3, 5, 7)))
    # The noisy head's labels carry no information about the digit.
    agree = (labels[:, 4] == digit).float().mean()
    assert 0.05 < agree < 0.15
    # Train and test images are disjoint (no image appears in both).
    train_rows = {tuple(row.tolist()) for row in x.reshape(len(x), -1)}
    assert not any(tuple(row.tolist()) in train_rows for row in x_test.reshape(len(x_test), -1)[:50])


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_model_exposes_trunk_features_and_heads(name):
    task = build_task(name, DigitsTaskConfig(hidden=16, train_pairs=64, test_pairs=32))
    x, _ = next(iter(task.data))
    features = task.model.trunk(x)
    assert features.shape == (len(x), 16)
    outputs = task.model(x)
    assert tuple(outputs) == task.sources == tuple(task.model.heads)
    losses = task.loss_fn(outputs, next(iter(task.data)))
    assert tuple(losses) == task.sources and all(v.ndim == 0 for v in losses.values())
    assert set(task.evaluate(task.model)) == {f"accuracy/{s}" for s in task.sources}


def test_train_task_flag(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--task", "digit-attributes-noisy", "--max-steps", "2", "--out", str(run_dir)]) == 0
    printed = capsys.readouterr()
    assert "accuracy/noisy" in printed.out and "digit-attributes-noisy" in printed.err


def test_peak_memory_on_the_cpu_counts_live_tensor_bytes():
    def work():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(1000, 1000)  # 8 MB live
        del a
        c = torch.empty(2000, 1000)  # 4 + 8 = 12 MB live: the peak
        del b
        return c

    result, peak = measure_peak_memory(work)
    assert result.shape == (2000, 1000)
    assert 12_000_000 <= peak < 12_100_000  # small tensors of the profiler's own may add a few bytes


def test_compare_flags_set_every_runs_config(tmp_path):
    import argparse

    from tolaria.trainer.compare import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--aggregators", "mgda, upgrad", "--seeds", "2", "--max-steps", "7", "--out", str(tmp_path)]
    settings = settings_from_args(parser.parse_args([*argv, "--mode", "low_memory"]))
    assert settings.aggregators == ("mgda", "upgrad") and settings.seeds == 2
    assert settings.config.max_steps == 7 and settings.config.aggregation_mode == "low_memory"
    settings = settings_from_args(parser.parse_args([*argv, "--aggregation-level", "features"]))
    assert settings.config.aggregation_level == "features" and settings.config.aggregation_mode == "buffer"
