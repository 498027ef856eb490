"""Fault loops for the shared signal, run in a subprocess by test_signal_faults.py, so that an
interpreter crash (a segfault, a SIGBUS) fails a test instead of killing pytest.

``python -m tests.emergency.signal_faults corrupt SEED REPETITIONS CORRUPTIONS``
    Per repetition: one fresh segment; CORRUPTIONS times, a valid record is restored through a raw
    mmap of /dev/shm/<name>, then random bytes or a hostile value are written over the header and
    record, and a handle attached before, a handle attached after, a waiter and a writer go at it.
    Then a second process writes random bytes nonstop while this one reads, waits and writes.

``python -m tests.emergency.signal_faults create SEED REPETITIONS PROCESSES``
    Per repetition: PROCESSES forked processes, released together by a barrier, all call
    ``create_or_attach`` on one new name.

Each prints one JSON line of counts; an outcome outside the allowed ones is counted under
``unexpected`` (with examples) and exits 1.
"""

from __future__ import annotations

import json
import mmap
import multiprocessing as mp
import os
import random
import struct
import sys
import uuid
from collections import Counter
from functools import partial

from tolaria.signals import MAX_REASON_BYTES, SharedEmergencySignal, SignalLayoutError

__all__ = ["corrupt", "create_concurrently", "main"]

LAYOUT = SharedEmergencySignal.LAYOUT
SIZE = SharedEmergencySignal.SEGMENT_SIZE
PAYLOAD = LAYOUT["payload"]
# EmergencyPayload: f64 timestamp_ms, i32 level, u32 reason_length, char reason[256].
FIELDS = {
    "magic": (LAYOUT["magic"], "<Q"),
    "layout_version": (LAYOUT["layout_version"], "<I"),
    "creator_pid": (LAYOUT["creator_pid"], "<I"),
    "segment_size": (LAYOUT["segment_size"], "<Q"),
    "writer_pid": (LAYOUT["writer_pid"], "<I"),
    "wake_word": (LAYOUT["wake_word"], "<I"),
    "seq": (LAYOUT["seq"], "<Q"),
    "generation": (LAYOUT["generation"], "<Q"),
    "trigger_generation": (LAYOUT["trigger_generation"], "<Q"),
    "is_set": (LAYOUT["is_set"], "<I"),
    "waiters": (LAYOUT["waiters"], "<I"),
    "timestamp_ms": (PAYLOAD, "<d"),
    "level": (PAYLOAD + 8, "<i"),
    "reason_length": (PAYLOAD + 12, "<I"),
}
REASON = PAYLOAD + 16
IDENTITY = LAYOUT["writer_pid"]  # the header fields before the writer lock say what the segment is
DEAD_PID = 2**31 - 2  # past any pid_max: names no process


def _hostile_value(rng: random.Random, field: str) -> int | float:
    fmt = FIELDS[field][1]
    if field == "seq":
        return rng.randrange(0, 2**63) | 1  # stuck odd: a write that never ends
    if field == "reason_length":
        return rng.choice([MAX_REASON_BYTES + 1, 2**32 - 1, rng.randrange(MAX_REASON_BYTES, 2**32)])
    if field == "writer_pid":  # never a live process: a live one is the slow case, tested on its own
        return rng.choice([0, DEAD_PID, 2**31, 2**32 - 1])
    if field == "timestamp_ms":
        return rng.choice([float("nan"), float("inf"), -1.0, 1e308])
    if fmt == "<i":
        return rng.randrange(-(2**31), 2**31)
    return rng.randrange(0, 2 ** (8 * struct.calcsize(fmt)))


def _corrupt_once(rng: random.Random, raw: mmap.mmap) -> str:
    """Writes one corruption; returns its kind."""
    roll = rng.random()
    if roll < 0.45:
        field = rng.choice(sorted(FIELDS))
        offset, fmt = FIELDS[field]
        raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, _hostile_value(rng, field))
        if field == "writer_pid" or (field == "seq" and rng.random() < 0.5):
            # Keep the odd sequence's writer dead, as a crashed writer leaves it.
            raw[LAYOUT["writer_pid"] : LAYOUT["writer_pid"] + 4] = struct.pack("<I", DEAD_PID)
        return f"field:{field}"
    if roll < 0.85:
        start = rng.randrange(0, SIZE)
        length = rng.randint(1, min(64, SIZE - start))
        raw[start : start + length] = rng.randbytes(length)
        _no_live_writer(raw)
        return "bytes:range"
    if roll < 0.95:
        raw[REASON : REASON + MAX_REASON_BYTES] = rng.randbytes(MAX_REASON_BYTES)
        raw[PAYLOAD + 12 : PAYLOAD + 16] = struct.pack("<I", rng.randint(0, MAX_REASON_BYTES))
        return "bytes:reason"
    raw[0:SIZE] = rng.randbytes(SIZE)
    _no_live_writer(raw)
    return "bytes:all"


def _no_live_writer(raw: mmap.mmap) -> None:
    # Random bytes might name this very process as the writer: that is the slow (STUCK_S) case,
    # covered by its own test, so keep the random loop fast.
    offset = LAYOUT["writer_pid"]
    if struct.unpack_from("<I", raw, offset)[0] in (os.getpid(), os.getppid()):
        raw[offset : offset + 4] = struct.pack("<I", DEAD_PID)


def _outcome(call) -> tuple[str, object]:
    try:
        return "ok", call()
    except SignalLayoutError:
        return "SignalLayoutError", None
    except RuntimeError as exc:  # mid-write records and stuck writer locks (not a layout error)
        if "mid-write" in str(exc) or "no consistent record" in str(exc) or "writer lock" in str(exc):
            return "RuntimeError:torn", None
        return f"unexpected:RuntimeError:{exc}", None
    except Exception as exc:
        return f"unexpected:{type(exc).__name__}:{exc}", None


def _check_state(state, raw: mmap.mmap, label: str, problems: list[str]) -> None:
    """A record read back must be a valid one, its reason taken from inside the reason buffer."""
    if not (0 <= state.level <= 4) or state.is_set != (state.level != 0):
        problems.append(f"{label}: invalid state {state!r}")
    data = state.reason.encode("utf-8")
    if len(data) > MAX_REASON_BYTES or bytes(raw[REASON : REASON + len(data)]) != data:
        problems.append(f"{label}: reason not from the segment's reason buffer: {state.reason!r}")


def corrupt(seed: int, repetitions: int, corruptions: int) -> int:
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    problems: list[str] = []
    for rep in range(repetitions):
        name = f"tolaria-fuzz-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        owner = SharedEmergencySignal.create(name)
        try:
            owner.trigger(2, "valid record ✓", 1234.5)
            live = SharedEmergencySignal.attach(name)
            with open(f"/dev/shm/{name}", "r+b") as f:
                raw = mmap.mmap(f.fileno(), 0)
            valid = bytes(raw[0:SIZE])
            for i in range(corruptions):
                raw[0:SIZE] = valid
                kinds[_corrupt_once(rng, raw)] += 1
                label = f"rep {rep} corruption {i}"
                result, state = _outcome(live.read)
                outcomes[f"read:{result}"] += 1
                if result == "ok":
                    _check_state(state, raw, label, problems)
                timeout_s, after = rng.choice([0.0, 0.0, 0.0, 0.0002]), rng.randrange(0, 2**63)
                result, _ = _outcome(partial(live.wait, timeout_s, after_generation=after))
                outcomes[f"wait:{result}"] += 1
                result, fresh = _outcome(partial(SharedEmergencySignal.attach, name))
                outcomes[f"attach:{result}"] += 1
                if result == "ok":
                    result, _ = _outcome(fresh.read)
                    outcomes[f"attach+read:{result}"] += 1
                    fresh.close()
                write = rng.choice(["raise_level", "trigger", "lower_level", "clear"])
                result, generation = _outcome(
                    {
                        "raise_level": partial(live.raise_level, 4, "halt over garbage"),
                        "trigger": partial(live.trigger, 3, "trigger over garbage"),
                        "lower_level": partial(live.lower_level, 2, 0, "lower over garbage"),
                        "clear": live.clear,
                    }[write]
                )
                outcomes[f"{write}:{result}"] += 1
                if result == "ok" and generation is not None:
                    # A write that succeeded left a record every reader takes.
                    after, state = _outcome(live.read)
                    outcomes[f"read-after-write:{after}"] += 1
                    if after != "ok":
                        problems.append(f"{label}: {write} succeeded but the next read gave {after}")
                    else:
                        _check_state(state, raw, label, problems)
            raw[0:SIZE] = valid
            outcomes.update(_concurrent_corruption(name, live, rng.randrange(2**32)))
            raw.close()
            live.close()
        finally:
            owner.close()
            owner.unlink()
    outcomes.update(_stuck_live_writer(problems))
    unexpected = {k: v for k, v in outcomes.items() if ":unexpected:" in k}
    print(
        json.dumps(
            {
                "repetitions": repetitions,
                "corruptions": repetitions * corruptions,
                "kinds": dict(sorted(kinds.items())),
                "outcomes": dict(sorted(outcomes.items())),
                "unexpected": unexpected,
                "problems": problems[:20],
            }
        )
    )
    return 1 if unexpected or problems else 0


def _stuck_live_writer(problems: list[str]) -> Counter[str]:
    """The slow case the random loop leaves out: a record stuck mid-write under a writer lock that
    names a live process (this one). Reads and writes give up after STUCK_S; a wait still times out."""
    outcomes: Counter[str] = Counter()
    name = f"tolaria-stuck-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with SharedEmergencySignal.create(name) as sig:
        sig.trigger(2, "before")
        with open(f"/dev/shm/{name}", "r+b") as f:
            raw = mmap.mmap(f.fileno(), 0)
        seq = struct.unpack_from("<Q", raw, LAYOUT["seq"])[0]
        raw[LAYOUT["seq"] : LAYOUT["seq"] + 8] = struct.pack("<Q", seq | 1)
        raw[LAYOUT["writer_pid"] : LAYOUT["writer_pid"] + 4] = struct.pack("<I", os.getpid())
        for op, call in (
            ("read", sig.read),
            ("trigger", partial(sig.trigger, 4, "x")),
            ("wait", partial(sig.wait, 0.01)),
        ):
            result, value = _outcome(call)
            outcomes[f"stuck-live-writer-{op}:{result}" + (f":{value}" if op == "wait" else "")] += 1
        expected = ("stuck-live-writer-read:RuntimeError:torn", "stuck-live-writer-wait:ok:False")
        if any(outcomes[key] != 1 for key in expected):
            problems.append(f"stuck live writer: {dict(outcomes)}")
        raw.close()
    return outcomes


def _scribble(name: str, seed: int, stop) -> None:
    """Another process: random bytes over the segment, nonstop, until `stop` (its parent reads)."""
    rng = random.Random(seed)
    with open(f"/dev/shm/{name}", "r+b") as f:
        raw = mmap.mmap(f.fileno(), 0)
    identity = bytes(raw[0:IDENTITY])
    while not stop.is_set():
        for _ in range(50):
            # Mostly past the identity fields (magic, version, creator, size): a broken identity
            # stays broken (no write repairs it), and the point is the seqlock and the record.
            start = rng.randrange(0, SIZE) if rng.random() < 0.05 else rng.randrange(IDENTITY, SIZE)
            length = rng.randint(1, min(16, SIZE - start))
            raw[start : start + length] = rng.randbytes(length)
            _no_live_writer(raw)  # getppid() here is the reading process
        raw[0:IDENTITY] = identity


def _concurrent_corruption(name: str, live, seed: int, rounds: int = 40) -> Counter[str]:
    """Reads, waits and writes while another process scribbles over the segment."""
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    child = ctx.Process(target=_scribble, args=(name, seed, stop))
    child.start()
    outcomes: Counter[str] = Counter()
    try:
        for done in range(1, rounds + 1):
            outcomes[f"concurrent-read:{_outcome(live.read)[0]}"] += 1
            outcomes[f"concurrent-wait:{_outcome(partial(live.wait, 0.0002, after_generation=2**62))[0]}"] += 1
            if done % 8 == 0:  # now and then a write, which replaces the scribbled record
                outcomes[f"concurrent-raise_level:{_outcome(partial(live.raise_level, 4, 'x'))[0]}"] += 1
    finally:
        stop.set()
        child.join(10.0)
        if child.is_alive():
            child.kill()
    if child.exitcode != 0:
        outcomes[f"concurrent-scribbler:unexpected:exit {child.exitcode}"] += 1
    return outcomes


def _create_one(name: str, barrier, opened, results) -> None:
    try:
        barrier.wait(10.0)
        sig = SharedEmergencySignal.create_or_attach(name)
        opened.wait(10.0)  # every process holds its handle: a creator that exited could be reclaimed
        if sig.created:
            sig.trigger(4, f"from {os.getpid()}")
        opened.wait(10.0)  # the creator has triggered
        results.put(("ok", sig.created, sig.read().reason))
        sig.close()
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}", None))


def create_concurrently(seed: int, repetitions: int, processes: int) -> int:
    ctx = mp.get_context("fork")
    counts: Counter[str] = Counter()
    problems: list[str] = []
    for rep in range(repetitions):
        name = f"tolaria-race-{os.getpid()}-{seed}-{rep}"
        barrier, opened, results = ctx.Barrier(processes), ctx.Barrier(processes), ctx.Queue()
        children = [ctx.Process(target=_create_one, args=(name, barrier, opened, results)) for _ in range(processes)]
        for child in children:
            child.start()
        outcomes = [results.get(timeout=30.0) for _ in children]
        for child in children:
            child.join(10.0)
        creators = [o for o in outcomes if o[0] == "ok" and o[1]]
        errors = [o[1] for o in outcomes if o[0] != "ok"]
        counts["created"] += len(creators)
        counts["attached"] += sum(1 for o in outcomes if o[0] == "ok" and not o[1])
        counts["failed"] += len(errors)
        if len(creators) != 1 or errors:
            problems.append(f"rep {rep}: {len(creators)} creators, errors {errors}")
        elif any(o[2] != creators[0][2] for o in outcomes):
            problems.append(f"rep {rep}: processes saw different records: {outcomes}")
        if any(child.exitcode != 0 for child in children):
            problems.append(f"rep {rep}: exit codes {[child.exitcode for child in children]}")
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")
    print(json.dumps({"repetitions": repetitions, "processes": processes, **counts, "problems": problems}))
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    mode, seed, repetitions, count = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    if mode == "corrupt":
        return corrupt(seed, repetitions, count)
    if mode == "create":
        return create_concurrently(seed, repetitions, count)
    raise SystemExit(f"unknown mode {mode!r}: corrupt or create")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
