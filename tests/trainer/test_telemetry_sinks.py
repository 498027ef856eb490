"""The telemetry additions the trainer relies on: TensorBoard sink, rate-limit summaries, drop counters."""

import sys

import pytest

from tolaria.telemetry import MemorySink, TelemetryEmitter, TensorBoardSink


def test_tensorboard_sink_writes_scalars_and_text(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    emitter = TelemetryEmitter([TensorBoardSink(tmp_path)], attributes={"step": 3})
    emitter.metric("train.loss", 0.5, source="left")
    emitter.metric("gradient.cosine", [[1.0, -0.25], [-0.25, 1.0]])
    emitter.event("safety.rollback", severity="warning", message="rolled back")
    emitter.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "train.loss/left" in tags["scalars"]
    assert [e.value for e in acc.Scalars("train.loss/left")] == [0.5] and acc.Scalars("train.loss/left")[0].step == 3
    assert "gradient.cosine/0_1" in tags["scalars"] and acc.Scalars("gradient.cosine/0_1")[0].value == -0.25
    assert any(t.startswith("safety.rollback") for t in tags["tensors"])  # text summaries are tensors


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'tolaria\[tensorboard\]'"):
        TensorBoardSink(tmp_path)


def test_suppressed_counts_are_summarised_at_close():
    sink = MemorySink()
    emitter = TelemetryEmitter([sink], rate_limits={"chatty": 2.0})
    for i in range(7):
        emitter.event("chatty", message=str(i))
    emitter.event("emergency.escalated", severity="critical", message="never limited")
    emitter.close()
    assert len(sink.of_kind("chatty")) == 2
    [summary] = sink.of_kind("rate_limited")
    assert summary["suppressed"] == 5 and summary["suppressed_kind"] == "chatty"
    [dropped] = sink.of_kind("dropped.rate_limit:chatty")
    assert dropped["value"] == 5
    assert len(sink.of_kind("emergency.escalated")) == 1


def test_emergencies_are_never_rate_limited():
    sink = MemorySink()
    emitter = TelemetryEmitter([sink], rate_limits={"emergency.escalated": 1.0})
    for _ in range(5):
        emitter.event("emergency.escalated", severity="warning", message="x")
    emitter.close()
    assert len(sink.of_kind("emergency.escalated")) == 5
