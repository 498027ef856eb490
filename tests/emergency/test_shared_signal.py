"""SharedEmergencySignal and SharedDeadlineSignal within one process: lifecycle, layout checks,
validation, records, waiting. Cross-process behaviour is in test_cross_process.py."""

import mmap
import os
import pickle
import struct
import subprocess
import sys
import threading
import time

import pytest

from tolaria.signals import (
    MAX_REASON_BYTES,
    DeadlineState,
    SharedDeadlineSignal,
    SharedEmergencySignal,
    SignalLayoutError,
    SignalState,
)

from .waiting import assert_close_ends_a_waiter
from .workers import KINDS, trigger

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pokes segments through /dev/shm")

LAYOUT = SharedEmergencySignal.LAYOUT


@pytest.fixture(params=sorted(KINDS))
def kind(request):
    return request.param


def raw_segment(name: str) -> mmap.mmap:
    """The segment's bytes, mapped directly (to fake crashes and foreign layouts)."""
    with open(f"/dev/shm/{name}", "r+b") as f:
        return mmap.mmap(f.fileno(), 0)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now
    return child.pid


def put_u32(buf: mmap.mmap, field: str, value: int) -> None:
    buf[LAYOUT[field] : LAYOUT[field] + 4] = struct.pack("<I", value)


def put_u64(buf: mmap.mmap, field: str, value: int) -> None:
    buf[LAYOUT[field] : LAYOUT[field] + 8] = struct.pack("<Q", value)


# ---- lifecycle ----------------------------------------------------------------------------------


def test_create_attach_read_round_trip(kind, signal_name):
    cls = KINDS[kind]
    with cls.create(signal_name) as owner, cls.attach(signal_name) as other:
        assert owner.name == other.name == signal_name
        assert owner.created and not other.created
        assert owner.reclaimed_pid is None
        state = other.read()
        assert (state.reason, state.timestamp_ms, state.generation, state.is_set) == ("", 0.0, 0, False)
        g1 = trigger(owner, kind, 3, "first", 10.5)
        g2 = trigger(other, kind, 2, "second", 20.25)
        assert (g1, g2) == (1, 2)
        for handle in (owner, other):
            state = handle.read()
            assert (state.reason, state.timestamp_ms, state.generation, state.is_set) == ("second", 20.25, 2, True)
            assert handle.is_set() and handle.generation == 2
        if kind == "emergency":
            assert other.read().level == 2


def test_states_are_plain_values():
    s = SignalState(level=4, reason="r", timestamp_ms=1.5, generation=3, is_set=True)
    d = DeadlineState(timestamp_ms=1.5, reason="r", generation=3, is_set=True)
    assert pickle.loads(pickle.dumps(s)) == s and pickle.loads(pickle.dumps(d)) == d
    assert s != SignalState(level=3, reason="r", timestamp_ms=1.5, generation=3, is_set=True)
    assert "level=4" in repr(s) and "reason='r'" in repr(d)
    assert len({s, pickle.loads(pickle.dumps(s))}) == 1


def test_default_timestamp_is_the_monotonic_clock(kind, signal_name):
    with KINDS[kind].create(signal_name) as sig:
        before = time.monotonic() * 1e3
        trigger(sig, kind, 1, "now")
        after = time.monotonic() * 1e3
        assert before <= sig.read().timestamp_ms <= after


def test_clear_resets_everything_and_bumps_the_generation(kind, signal_name):
    with KINDS[kind].create(signal_name) as sig:
        trigger(sig, kind, 4, "halt", 99.0)
        assert sig.clear() == 2
        state = sig.read()
        assert (state.reason, state.timestamp_ms, state.generation, state.is_set) == ("", 0.0, 2, False)
        assert not sig.is_set()
        if kind == "emergency":
            assert state.level == 0


def test_context_manager_unlinks_only_for_the_creator(kind, signal_name):
    cls = KINDS[kind]
    creator = cls.create(signal_name)
    with cls.attach(signal_name) as attached:
        pass
    assert attached.closed and os.path.exists(f"/dev/shm/{signal_name}")
    with creator:
        pass
    assert creator.closed and not os.path.exists(f"/dev/shm/{signal_name}")
    with pytest.raises(FileNotFoundError, match="no longer exists"):
        creator.unlink()


def test_closed_handle_refuses_calls(kind, signal_name):
    with KINDS[kind].create(signal_name) as sig:
        sig.close()
        sig.close()  # idempotent
        for call in (sig.read, sig.is_set, sig.clear, lambda: sig.wait(0.0), lambda: trigger(sig, kind, 1, "x")):
            with pytest.raises(ValueError, match="is closed"):
                call()


def test_unlink_refuses_a_name_that_now_holds_another_segment(signal_name):
    old = SharedEmergencySignal.create(signal_name)
    old.unlink()
    with SharedEmergencySignal.create(signal_name):
        with pytest.raises(RuntimeError, match="different segment"):
            old.unlink()
    old.close()


# ---- names, layouts, reclaiming -----------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a/b", "/leading", ".hidden", "sp ace", "x" * 201, "nul\0byte", "é"])
def test_bad_names_are_rejected(kind, bad):
    for open_ in (KINDS[kind].create, KINDS[kind].attach):
        with pytest.raises(ValueError, match="invalid signal name"):
            open_(bad)


def test_attach_to_a_missing_name(kind, signal_name):
    with pytest.raises(FileNotFoundError, match="create\\(\\) it first"):
        KINDS[kind].attach(signal_name)


def test_create_refuses_a_live_creators_signal(kind, signal_name):
    with KINDS[kind].create(signal_name):
        with pytest.raises(FileExistsError, match=f"creator \\(pid {os.getpid()}\\) is alive"):
            KINDS[kind].create(signal_name)


def test_attach_refuses_the_other_kind(signal_name):
    with SharedDeadlineSignal.create(signal_name):
        with pytest.raises(SignalLayoutError, match="holds a Tolaria deadline signal"):
            SharedEmergencySignal.attach(signal_name)
        with pytest.raises(SignalLayoutError, match="holds a Tolaria deadline signal"):
            SharedEmergencySignal.create(signal_name)


def test_foreign_segment_is_refused_not_destroyed(kind, signal_name):
    path = f"/dev/shm/{signal_name}"
    with open(path, "wb") as f:
        f.write(b"not a tolaria signal, just bytes".ljust(4096, b"\x7f"))
    with pytest.raises(SignalLayoutError, match="foreign segment"):
        KINDS[kind].attach(signal_name)
    with pytest.raises(SignalLayoutError, match="foreign segment"):
        KINDS[kind].create(signal_name)
    assert os.path.exists(path)


def test_older_layout_is_refused_on_attach_and_replaced_by_create_once_its_creator_died(kind, signal_name):
    cls = KINDS[kind]
    sig = cls.create(signal_name)
    trigger(sig, kind, 2, "old")
    raw = raw_segment(signal_name)
    put_u32(raw, "layout_version", cls.LAYOUT_VERSION - 1)
    with pytest.raises(SignalLayoutError, match=f"layout version {cls.LAYOUT_VERSION - 1}; this build reads"):
        cls.attach(signal_name)
    with pytest.raises(FileExistsError):  # its creator (this process) is alive: not reclaimable yet
        cls.create(signal_name)
    put_u32(raw, "creator_pid", dead_pid())
    raw.close()
    sig.close()  # no unlink: as a crashed creator leaves it
    with cls.create(signal_name) as fresh:
        assert fresh.reclaimed_pid is None  # replaced, not adopted
        assert fresh.read().generation == 0 and not fresh.is_set()
        assert len(raw_segment(signal_name)) == cls.SEGMENT_SIZE


def test_segment_abandoned_mid_creation_is_reclaimed(signal_name):
    # A creator that died between shm_open and writing the header leaves a zero-filled segment;
    # attach and create give it a 1 s grace period first.
    with open(f"/dev/shm/{signal_name}", "wb") as f:
        f.write(bytes(64))
    with pytest.raises(SignalLayoutError, match="never initialised"):
        SharedEmergencySignal.attach(signal_name)
    with SharedEmergencySignal.create(signal_name) as sig:
        assert sig.read().generation == 0


def test_dead_creators_segment_is_adopted_in_place(kind, signal_name, caplog):
    cls = KINDS[kind]
    first = cls.create(signal_name)
    survivor = cls.attach(signal_name)
    trigger(first, kind, 4, "before the crash")
    gone = dead_pid()
    raw = raw_segment(signal_name)
    put_u32(raw, "creator_pid", gone)
    raw.close()
    first.close()  # no unlink: as a crashed creator leaves it
    with caplog.at_level("WARNING", logger="tolaria.signals"), cls.create(signal_name) as adopted:
        assert adopted.reclaimed_pid == gone
        assert f"dead process {gone}" in caplog.text
        state = adopted.read()
        assert not state.is_set and state.reason == "" and state.generation == 2  # cleared; generation kept counting
        # Processes still attached stay connected to the adopted segment.
        trigger(adopted, kind, 3, "after")
        assert survivor.read().reason == "after"
    survivor.close()


def test_writer_that_died_mid_write_is_detected_and_repaired(signal_name):
    with SharedEmergencySignal.create(signal_name) as sig:
        sig.trigger(2, "intact")
        raw = raw_segment(signal_name)
        seq = struct.unpack_from("<Q", raw, LAYOUT["seq"])[0]
        put_u64(raw, "seq", seq + 1)  # odd: a write in progress...
        put_u32(raw, "writer_pid", dead_pid())  # ...by a process that no longer exists
        with pytest.raises(RuntimeError, match="died mid-write"):
            sig.read()
        assert sig.trigger(4, "repaired") == 2  # takes the dead writer's lock over
        assert sig.read() == SignalState(
            level=4, reason="repaired", timestamp_ms=sig.read().timestamp_ms, generation=2, is_set=True
        )
        assert struct.unpack_from("<Q", raw, LAYOUT["seq"])[0] % 2 == 0
        assert struct.unpack_from("<I", raw, LAYOUT["writer_pid"])[0] == 0
        raw.close()


def test_header_identifies_the_kind_and_version(signal_name):
    with SharedEmergencySignal.create(signal_name):
        raw = raw_segment(signal_name)
        assert raw[0:8] == b"TLRSEMRG"
        assert struct.unpack_from("<I", raw, LAYOUT["layout_version"])[0] == SharedEmergencySignal.LAYOUT_VERSION
        assert struct.unpack_from("<I", raw, LAYOUT["creator_pid"])[0] == os.getpid()
        assert len(raw) == SharedEmergencySignal.SEGMENT_SIZE
        raw.close()
    assert SharedDeadlineSignal.MAGIC.to_bytes(8, "little") == b"TLRSDDLN"


# ---- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 5, -1, 100, True, 2.0, "HALT", None])
def test_bad_levels_are_rejected(signal_name, bad):
    with SharedEmergencySignal.create(signal_name) as sig:
        for call in (sig.trigger, sig.raise_level):
            with pytest.raises(ValueError, match="emergency level"):
                call(bad, "reason")
        assert sig.read().generation == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_timestamps_are_rejected(kind, signal_name, bad):
    with KINDS[kind].create(signal_name) as sig:
        with pytest.raises(ValueError, match="monotonic_ms"):
            trigger(sig, kind, 1, "r", bad)


@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_bad_timeouts_and_generations_are_rejected(kind, signal_name, bad):
    with KINDS[kind].create(signal_name) as sig:
        with pytest.raises(ValueError, match="timeout_s"):
            sig.wait(bad)
        with pytest.raises(ValueError, match="after_generation"):
            sig.wait(0.0, after_generation=-1)


def test_reason_must_be_text(kind, signal_name):
    with KINDS[kind].create(signal_name) as sig:
        with pytest.raises(TypeError):
            trigger(sig, kind, 1, b"bytes")


@pytest.mark.parametrize(
    "reason, expected",
    [
        ("short", "short"),
        ("a" * 300, "a" * 256),
        ("a" * 255 + "é", "a" * 255),  # 2-byte character across the limit: left out whole
        ("a" * 254 + "€x", "a" * 254),  # 3-byte
        ("a" * 253 + "🔥", "a" * 253),  # 4-byte
        ("a" * 252 + "🔥", "a" * 252 + "🔥"),  # ends exactly at the limit
        ("é" * 200, "é" * 128),
    ],
)
def test_reason_is_cut_on_a_character_boundary(kind, signal_name, reason, expected):
    assert MAX_REASON_BYTES == 256
    with KINDS[kind].create(signal_name) as sig:
        trigger(sig, kind, 1, reason)
        assert sig.read().reason == expected


def test_raise_level_never_lowers(signal_name):
    with SharedEmergencySignal.create(signal_name) as sig:
        assert sig.raise_level(2, "elevated") == 1
        assert sig.raise_level(2, "same") is None
        assert sig.raise_level(1, "lower") is None
        assert sig.read().reason == "elevated"
        assert sig.raise_level(4, "halt") == 2
        sig.clear()
        assert sig.raise_level(1, "after clear") == 4


# ---- waiting ------------------------------------------------------------------------------------


def test_wait_times_out_and_returns_at_once_for_a_past_trigger(kind, signal_name):
    with KINDS[kind].create(signal_name) as sig:
        assert sig.wait(0.0) is False
        assert sig.wait(0.02) is False
        trigger(sig, kind, 1, "r")
        assert sig.wait(0.0, after_generation=0) is True
        assert sig.wait(0.0, after_generation=1) is False


def test_wait_releases_the_gil_and_wakes_on_trigger(kind, signal_name):
    # If wait() held the GIL, this thread could not trigger until the waiter's 30 s timeout ran out.
    with KINDS[kind].create(signal_name) as sig:
        result = []
        waiter = threading.Thread(target=lambda: result.append(sig.wait(30.0, after_generation=0)))
        waiter.start()
        time.sleep(0.05)
        trigger(sig, kind, 4, "wake up")
        waiter.join(10)
        assert result == [True]


def test_clear_does_not_release_waiters(kind, signal_name):
    with KINDS[kind].create(signal_name) as sig:
        result = []
        waiter = threading.Thread(target=lambda: result.append(sig.wait(0.3)))
        waiter.start()
        time.sleep(0.05)
        sig.clear()
        waiter.join(10)
        assert result == [False]


def test_close_ends_waiters_in_this_process(kind, signal_name):
    sig = KINDS[kind].create(signal_name)
    assert_close_ends_a_waiter(sig, sig.close)
    sig.unlink()
