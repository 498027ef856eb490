"""Trainer end to end on a tiny two-task problem: telemetry, faults, HALT, checkpoints, resume."""

import json
import math
import threading

import pytest
import torch

from tolaria.emergency import EmergencyLevel
from tolaria.telemetry import MemorySink, TelemetryEmitter
from tolaria.trainer import LRConfig, RunSummary, TelemetryConfig, Trainer, TrainerConfig
from tolaria.trainer.config import CheckpointConfig, ConfigError, ProfilerConfig, SafetyConfig
from tolaria.trainer.loop import first_tensor, move_to, split_inputs

from .helpers import NaNLoss, make_problem, two_task_loss


def config(tmp_path, **kw):
    kw.setdefault("epochs", 2)
    return TrainerConfig(device="cpu", run_dir=str(tmp_path / "run"), **kw)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "telemetry.jsonl").read_text().splitlines()]


def test_fit_trains_two_sources_and_reports(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    cfg = config(tmp_path, epochs=3, telemetry=TelemetryConfig(log_every_steps=2), lr=LRConfig(policy="cosine"))
    evaluations = []

    def evaluate(m):
        assert not m.training and not torch.is_grad_enabled()
        evaluations.append(1)
        return {"score": 1.0}

    summary = Trainer(model, optimizer, data, loss_fn, cfg, evaluate=evaluate).fit()
    assert isinstance(summary, RunSummary)
    assert summary.status == "completed" and summary.epochs == 3 and summary.steps == 3 * len(data)
    assert summary.sources == ("a", "b") and set(summary.final_losses) == {"a", "b"}
    assert summary.metrics == {"score": 1.0} and len(evaluations) == 3
    assert 0.0 <= summary.conflict_rate <= 1.0
    assert summary.last_checkpoint_step == summary.steps
    assert model.training
    recs = records(summary.run_dir)
    kinds = {r["kind"] for r in recs}
    assert {
        "train.loss",
        "gradient.weight",
        "gradient.norm",
        "gradient.share",
        "gradient.conflicts",
        "gradient.cosine",
        "train.lr",
        "train.epoch",
        "train.end",
        "train.checkpoint",
    } <= kinds
    assert {r["source"] for r in recs if r["kind"] == "train.loss"} == {"a", "b"}
    assert all({"run_id", "epoch", "step", "rank"} <= set(r) for r in recs)
    lrs = [r["value"] for r in recs if r["kind"] == "train.lr"]
    assert lrs[-1] < lrs[0]  # cosine over the run's total steps
    assert (summary.run_dir / "run_config.json").exists()
    assert "conflict rate" in summary.table()


def test_training_reduces_the_loss(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    first = sum(loss_fn(model(data[0][0]), data[0]).values()).item()
    Trainer(model, optimizer, data, loss_fn, config(tmp_path, epochs=6)).fit()
    assert sum(loss_fn(model(data[0][0]), data[0]).values()).item() < 0.5 * first


def test_single_source_and_mapping_batches(tmp_path):
    model, optimizer, data, _ = make_problem()
    batches = [{"inputs": x, "targets": y} for x, y in data]

    def loss_fn(outputs, batch):
        assert batch["targets"].device == outputs["a"].device
        return ((outputs["a"] - batch["targets"][:, 0]) ** 2).mean()

    summary = Trainer(model, optimizer, batches, loss_fn, config(tmp_path, epochs=1)).fit()
    assert summary.sources == ("loss",) and summary.conflict_rate is None and summary.steps == len(data)


def test_batch_helpers():
    x, y = torch.ones(2), torch.zeros(2)
    assert split_inputs((x, y)) is x and split_inputs({"inputs": x}) is x and split_inputs(x) is x
    with pytest.raises(KeyError, match="'inputs'"):
        split_inputs({"x": x})
    with pytest.raises(TypeError):
        split_inputs(3)
    moved = move_to({"a": (x, [y]), "n": 3}, torch.device("cpu"))
    assert moved["n"] == 3 and torch.equal(moved["a"][1][0], y)
    assert first_tensor({"k": [None, (y, x)]}) is y and first_tensor([1, "a"]) is None


def test_max_steps_stops_mid_epoch(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    summary = Trainer(model, optimizer, data, loss_fn, config(tmp_path, epochs=5, max_steps=11)).fit()
    assert summary.status == "max_steps" and summary.steps == 11 and summary.epochs == 1
    assert summary.last_checkpoint_step == 11


def test_nan_losses_are_skipped_and_rolled_back(tmp_path):
    model, optimizer, data, _ = make_problem()
    cfg = config(
        tmp_path, epochs=3, checkpoint=CheckpointConfig(snapshot_every_steps=4), safety=SafetyConfig(rollback_after=3)
    )
    summary = Trainer(model, optimizer, data, NaNLoss(start=7, count=3), cfg).fit()
    assert summary.status == "completed"
    assert summary.skipped_steps == 3 and summary.rollbacks == 1
    # 24 batches: 3 skipped; the rollback from step 6 to the snapshot of step 4 undoes 2 steps.
    assert summary.steps == 24 - 3 - 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    recs = records(summary.run_dir)
    [rollback] = [r for r in recs if r["kind"] == "safety.rollback"]
    assert rollback["ok"] and rollback["restored_step"] == 4
    levels = [r["level"] for r in recs if r["kind"] in ("emergency.escalated", "emergency.deescalated")]
    assert levels == ["NOTICE", "ELEVATED", "NONE"]


def test_persistent_nan_halts_with_a_final_checkpoint(tmp_path):
    model, optimizer, data, _ = make_problem()
    cfg = config(tmp_path, epochs=3, safety=SafetyConfig(rollback_after=2, max_rollbacks=1))
    summary = Trainer(model, optimizer, data, NaNLoss(start=3, count=10**6), cfg).fit()
    assert summary.status == "halted" and "max_rollbacks" in summary.halt_reason
    assert summary.last_checkpoint_step == summary.steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


class HangingPolicy:
    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def evaluate(self, state):
        self.calls += 1
        if self.calls == 1:
            self.release.wait()  # hangs until the test ends
        return [("note", state.epoch)]


class RecordingExecutor:
    def __init__(self):
        self.applied = []

    def apply(self, command):
        self.applied.append(command)


@pytest.mark.timeout(60)
def test_hung_policy_does_not_stall_training(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    policy, executor = HangingPolicy(), RecordingExecutor()
    cfg = config(tmp_path, epochs=4, control_timeout_s=0.2)
    try:
        summary = Trainer(model, optimizer, data, loss_fn, cfg, policy=policy, executor=executor).fit()
    finally:
        policy.release.set()
    assert summary.status == "completed" and summary.epochs == 4
    assert summary.control_failures == 1
    assert executor.applied == [("note", 2), ("note", 3)]  # epoch 1 hung, epoch 2 withheld (probe)
    kinds = [r["kind"] for r in records(summary.run_dir)]
    assert "control.timeout" in kinds and "control.withheld" in kinds and "control.recovered" in kinds
    levels = [r["level"] for r in records(summary.run_dir) if r["kind"].startswith("emergency.")]
    assert levels == ["CONSERVATIVE", "NONE"]


def test_local_halt_stops_cleanly_with_a_final_checkpoint(tmp_path):
    model, optimizer, data, _ = make_problem()
    holder = {}

    def loss_fn(outputs, batch):
        holder["calls"] = holder.get("calls", 0) + 1
        if holder["calls"] == 5:
            holder["trainer"].emergency.escalate(EmergencyLevel.HALT, "stop requested by the test")
        return two_task_loss(outputs, batch)

    trainer = Trainer(model, optimizer, data, loss_fn, config(tmp_path, epochs=3))
    holder["trainer"] = trainer
    summary = trainer.fit()
    assert summary.status == "halted" and summary.halt_reason == "stop requested by the test"
    assert summary.steps == 5 and summary.last_checkpoint_step == 5
    [end] = [r for r in records(summary.run_dir) if r["kind"] == "train.end"]
    assert end["status"] == "halted"


def test_resume_continues_from_the_checkpoint(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    first = Trainer(model, optimizer, data, loss_fn, config(tmp_path, epochs=2)).fit()
    saved = [p.detach().clone() for p in model.parameters()]
    model2, optimizer2, _, _ = make_problem(seed=123)  # different weights: must be replaced by the checkpoint's
    cfg = config(tmp_path, epochs=3, checkpoint=CheckpointConfig(resume=True))
    trainer = Trainer(model2, optimizer2, data, loss_fn, cfg)
    summary = trainer.fit()
    assert summary.resumed_from_step == first.steps
    assert summary.steps == first.steps + len(data) and summary.epochs == 3
    assert trainer.lr.last_step == summary.steps - 1
    # The resumed run's starting point was the first run's end state.
    resumed = [r for r in records(summary.run_dir) if r["kind"] == "train.resume"]
    assert resumed and resumed[0]["restored_step"] == first.steps
    assert not all(torch.equal(p, s) for p, s in zip(model2.parameters(), saved))  # and it trained on


def test_resume_of_a_partial_epoch_continues_after_its_last_used_batch(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    Trainer(model, optimizer, data, loss_fn, config(tmp_path, epochs=2, max_steps=12)).fit()
    model2, optimizer2, _, _ = make_problem()
    cfg = config(tmp_path, epochs=2, checkpoint=CheckpointConfig(resume=True))
    summary = Trainer(model2, optimizer2, data, loss_fn, cfg).fit()
    # Batches 1-4 of epoch 2 were used before the stop: only 5-8 remain (tests/trainer/test_run_position.py).
    assert summary.resumed_from_step == 12 and summary.steps == 2 * len(data)


class FlakySink:
    """Fails its first ``failures`` writes, then accepts."""

    def __init__(self, failures):
        self.failures = failures
        self.records = []

    def write(self, records):
        if self.failures:
            self.failures -= 1
            raise OSError("disk unavailable")
        self.records.extend(records)

    def close(self):
        pass


def test_failing_sink_keeps_its_queue_and_retries(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    flaky, memory = FlakySink(failures=3), MemorySink()
    telemetry = TelemetryEmitter([flaky, memory], batch_size=8)
    Trainer(model, optimizer, data, loss_fn, config(tmp_path), telemetry=telemetry).fit()
    telemetry.close()
    assert telemetry.counters["sink_retries"] == 3
    assert [r["kind"] for r in flaky.records] == [r["kind"] for r in memory.records]
    assert any(r["kind"] == "train.end" for r in flaky.records)
    assert telemetry.pending() == 0


def test_profiler_writes_traces_to_the_run_folder(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    cfg = config(tmp_path, epochs=1, profiler=ProfilerConfig(enabled=True, wait=1, warmup=1, active_steps=2))
    summary = Trainer(model, optimizer, data, loss_fn, cfg).fit()
    assert len(list((summary.run_dir / "traces").glob("*.pt.trace.json"))) == 1


def test_construction_errors(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    with pytest.raises(ValueError, match="unknown aggregator"):
        Trainer(model, optimizer, data, loss_fn, config(tmp_path, aggregator="nope"))
    with pytest.raises(ConfigError, match="lr.t_max"):
        Trainer(model, optimizer, iter(data), loss_fn, config(tmp_path, lr=LRConfig(policy="cosine")))
    with pytest.raises(TypeError, match="TrainerConfig"):
        Trainer(model, optimizer, data, loss_fn, {"epochs": 1})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Trainer(model, optimizer, data, loss_fn, TrainerConfig(device="cuda", run_dir=str(tmp_path / "x")))


def test_fit_runs_once(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    trainer = Trainer(model, optimizer, data, loss_fn, config(tmp_path, epochs=1))
    trainer.fit()
    with pytest.raises(RuntimeError, match="already called"):
        trainer.fit()


def test_a_crash_in_loss_fn_is_reported_and_raised(tmp_path):
    model, optimizer, data, _ = make_problem()

    def loss_fn(outputs, batch):
        raise RuntimeError("bad loss")

    trainer = Trainer(model, optimizer, data, loss_fn, config(tmp_path, epochs=1))
    with pytest.raises(RuntimeError, match="bad loss"):
        trainer.fit()
    [crash] = [r for r in records(trainer.run_dir) if r["kind"] == "train.crashed"]
    assert crash["severity"] == "critical"
    assert math.isfinite(sum(p.sum().item() for p in model.parameters()))


def test_a_failed_snapshot_is_reported_and_training_goes_on(tmp_path, monkeypatch):
    from tolaria.state import StateError

    model, optimizer, data, loss_fn = make_problem()
    cfg = config(tmp_path, epochs=1, checkpoint=CheckpointConfig(snapshot_every_steps=2))
    trainer = Trainer(model, optimizer, data, loss_fn, cfg)
    real = trainer.state.snapshot
    calls = []

    def snapshot(step, model, optimizer, extra=None):
        calls.append(step)
        if len(calls) > 1:
            raise StateError("the fast cache is full")
        return real(step, model, optimizer, extra)

    monkeypatch.setattr(trainer.state, "snapshot", snapshot)
    summary = trainer.fit()
    assert summary.status == "completed" and summary.steps == len(data)
    failed = [r for r in records(summary.run_dir) if r["kind"] == "train.snapshot_failed"]
    assert len(failed) == len(data) // 2 and "the fast cache is full" in failed[0]["message"]


def test_close_releases_an_unfitted_trainer_and_a_failed_construction(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    with Trainer(model, optimizer, data, loss_fn, config(tmp_path)):
        pass
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    bad = config(tmp_path, profiler=ProfilerConfig(enabled=True, trace_dir=str(blocker / "traces")))
    with pytest.raises(Exception, match="trace directory"):
        Trainer(model, optimizer, data, loss_fn, bad)  # fails after the StateManager took the folder lock
    summary = Trainer(model, optimizer, data, loss_fn, config(tmp_path, epochs=1)).fit()  # the lock was released
    assert summary.status == "completed"
    trainer = Trainer(model, optimizer, data, loss_fn, config(tmp_path, epochs=1))
    trainer.close()
    with pytest.raises(RuntimeError, match="closed"):
        trainer.fit()


class CountingPolicy:
    def __init__(self):
        self.steps = []

    def evaluate(self, state):
        self.steps.append(state.step)
        return []


def test_per_step_control(tmp_path):
    model, optimizer, data, loss_fn = make_problem()
    policy = CountingPolicy()
    Trainer(model, optimizer, data, loss_fn, config(tmp_path, epochs=1, control_every_steps=3), policy=policy).fit()
    assert policy.steps == [3, 6, 8]  # every 3 steps, then the epoch end


class GraftingPolicy:
    def evaluate(self, state):
        return ["graft"] if state.epoch == 0 else []


class GraftingExecutor:
    """Grafts a new parameter into the model: the trainer must rebuild the optimizer and the buffer."""

    def __init__(self, model):
        self.model = model

    def apply(self, command):
        self.model.extra = torch.nn.Linear(12, 1)
        return "grafted"


def _grafting_trainer(tmp_path):
    """Two epochs whose first boundary grafts `model.extra`: (model, optimizer, data, trainer)."""
    model, optimizer, data, loss_fn = make_problem()
    executor = GraftingExecutor(model)
    trainer = Trainer(
        model, optimizer, data, loss_fn, config(tmp_path, epochs=2), policy=GraftingPolicy(), executor=executor
    )
    return model, optimizer, data, trainer


def test_grafted_parameters_rebuild_the_optimizer(tmp_path):
    model, optimizer, data, trainer = _grafting_trainer(tmp_path)
    summary = trainer.fit()
    assert summary.status == "completed" and summary.steps == 2 * len(data)
    params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(model.extra.weight) in params and trainer.optimizer is not optimizer
    assert any(p is model.extra.weight for p in trainer.stage.params)
    assert [r["added"] for r in records(summary.run_dir) if r["kind"] == "train.rebuilt"] == [2]


def test_a_failed_rebuild_after_a_graft_halts_instead_of_training_on_without_the_new_layer(tmp_path, monkeypatch):
    from tolaria.optim import OptimizerManager

    def broken(self, model):
        raise RuntimeError("no room for the new parameters")

    model, optimizer, data, trainer = _grafting_trainer(tmp_path)
    monkeypatch.setattr(trainer.optim, "_build", broken.__get__(trainer.optim, OptimizerManager), raising=False)
    summary = trainer.fit()
    assert summary.status == "halted" and "optimizer rebuild failed" in summary.halt_reason
    assert summary.steps == len(data)  # it stopped at the epoch boundary where the graft happened
    [event] = [r for r in records(summary.run_dir) if r["kind"] == "train.rebuild_failed"]
    assert event["severity"] == "critical"
