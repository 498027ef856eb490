"""Rollback and checkpoint speed of tolaria.state, side by side with the floor and the prototype.

    python benchmarks/rollback.py                   # 10M and 100M parameters (fp32, Adam)
    python benchmarks/rollback.py --sizes 10M       # one size
    python benchmarks/rollback.py --repeats 5 --dir /mnt/fast/tmp
    python -m pytest benchmarks/rollback.py --benchmark-only             # pytest-benchmark, 10M parameters
    TOLARIA_BENCH_PARAMS=1M python -m pytest benchmarks/rollback.py --benchmark-only

For each model size (a stack of Linear layers, fp32, with Adam's state: about 3x the parameter
bytes), in one process, the alternatives interleaved, best of ``--repeats`` (the minimum: on a shared
machine, the run least disturbed by other processes, taken the same way for every column):

Fast tier (memory)
- ``snapshot``: ``StateManager.snapshot`` vs the floor, one ``clone()`` of a flat tensor holding the
  same number of bytes, vs the prototype (``torch.save`` of both state dicts into a ``BytesIO``).
- ``fast restore``: ``StateManager.rollback`` from that snapshot vs the floor, one ``copy_`` of the
  same bytes into a preallocated tensor, vs the prototype (``torch.load`` of the buffer, then
  ``load_state_dict`` on model and optimizer).

Durable tier (disk). Before each timed save, the previous file of that kind has been deleted and
``os.sync()`` has run, so both start alike with nothing dirty; the order of the two alternates.
- ``durable save``: ``StateManager.checkpoint`` (write + checksum + fsync + rename + manifest
  commit; the previous checkpoint is deleted afterwards, in the background) vs a plain sequential
  write of the same bytes (the checkpoint file's own content) to a new file plus fsync.
- ``durable restore``: ``StateManager.restore_latest`` (read + checksum + load + copy into the
  model) vs a plain sequential read of the same bytes; both files are dropped from the page cache
  first (``posix_fadvise(DONTNEED)``), so both read from the device.

The durable rows use the default checksum (crc32); below 50M parameters they are repeated with
sha256 for comparison (``--checksums`` picks). Peak memory at 100M is about 6 GiB: the model and
its optimizer, one snapshot, and the floor's two buffers or the prototype's bytes (never all at once).

Targets (from the issue): fast restore within 1.5x of the copy floor and at least 10x faster than
the prototype; durable save within 1.5x of the plain write.

The pytest-benchmark form times, at the smallest size above (10M parameters; ``TOLARIA_BENCH_PARAMS``
changes it), ``snapshot``, ``fast restore`` and ``durable save`` (crc32) against their floors as
above (clone, ``copy_``, plain write + fsync of the checkpoint's bytes, with the previous file deleted
and ``os.sync()`` run, untimed, before each round); each benchmark has its own rounds, not
interleaved. ``extra_info["x_floor"]`` holds Tolaria's time over the floor's. No assertion on timings.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from tolaria.aggregation import cpu_isa
from tolaria.state import StateManager
from tolaria.state.baselines import pickled_restore, pickled_snapshot
from tolaria.telemetry import MemorySink, TelemetryEmitter

_CHUNK = 8 << 20


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text[:-1] if text[-1] in "KMG" else text) * scale)


def build(n_params: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Linear layers (no bias) of width 1024 (2048 from 50M) adding up to about ``n_params``; Adam with state."""
    width = 1024 if n_params < 50_000_000 else 2048
    layers = max(1, round(n_params / (width * width)))
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()  # creates exp_avg and exp_avg_sq
    for p in model.parameters():
        p.grad = None
    return model, optimizer


def state_nbytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_write(path: Path, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < data.nbytes:
            offset += os.write(fd, data[offset : offset + _CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_read(path: Path, into: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        offset = 0
        while offset < into.nbytes:
            n = f.readinto(into[offset : offset + _CHUNK])
            if not n:
                raise OSError(f"{path}: short read at {offset} of {into.nbytes} bytes")
            offset += n


def best(values: list[float]) -> float:
    return min(values)


Rows = dict[str, tuple[float, float, float | None]]


def bench_size(n_params: int, repeats: int, work_dir: Path, checksums: list[str]) -> Rows:
    """{row: (tolaria seconds, floor seconds, prototype seconds or None)} plus the byte counts."""
    model, optimizer = build(n_params)
    nbytes = state_nbytes(model, optimizer)
    params = sum(p.numel() for p in model.parameters())
    rows: Rows = {}
    root = work_dir / f"fast-{n_params}"
    cache_mb = nbytes * 1.05 / (1 << 20) + 1  # room for one snapshot: a new one replaces the old
    with StateManager(root, fast_cache_mb=cache_mb, keep_last=1, telemetry=TelemetryEmitter([MemorySink()])) as manager:
        # ---- fast tier ----
        snap, restore, floor_snap, floor_restore = [], [], [], []
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        dst = torch.empty_like(src).fill_(0)
        manager.snapshot(0, model, optimizer)  # warm-up (first-touch costs, lazy imports)
        assert manager.rollback(0, model, optimizer, deadline_s=600).ok
        for _ in range(repeats):
            floor_snap.append(timed(lambda: src.clone()))
            snap.append(timed(lambda: manager.snapshot(0, model, optimizer)))
            floor_restore.append(timed(lambda: dst.copy_(src)))
            result_holder: list = []
            restore.append(timed(lambda: result_holder.append(manager.rollback(0, model, optimizer, deadline_s=600))))
            assert result_holder[0].ok and result_holder[0].tier == "fast", result_holder[0]
        del src, dst
        manager._snapshots.clear()  # noqa: SLF001 -- free its memory before the prototype needs some
        gc.collect()
        proto_snap, proto_restore = [], []
        for _ in range(repeats):
            buffer_holder: list = []
            proto_snap.append(timed(lambda: buffer_holder.append(pickled_snapshot(model, optimizer))))
            proto_restore.append(timed(lambda: pickled_restore(buffer_holder[0], model, optimizer)))
            del buffer_holder
            gc.collect()
        rows["snapshot"] = (best(snap), best(floor_snap), best(proto_snap))
        rows["fast restore"] = (best(restore), best(floor_restore), best(proto_restore))

    # ---- durable tier, once per checksum ----
    for checksum in checksums:
        suffix = "" if checksum == checksums[0] else f" ({checksum})"
        save, write, load, read = [], [], [], []
        with StateManager(
            work_dir / f"durable-{n_params}-{checksum}",
            fast_cache_mb=0,
            keep_last=1,
            telemetry=TelemetryEmitter([MemorySink()]),
            checksum=checksum,
        ) as manager:
            manager.checkpoint(0, model, optimizer)  # warm-up
            file_bytes = manager.checkpoints[-1].nbytes
            # The plain write writes the checkpoint's own bytes (not a constant pattern a storage
            # layer could compress or deduplicate), so both sides move exactly the same data.
            payload = torch.empty(file_bytes, dtype=torch.uint8)
            plain_read(manager.root / manager.checkpoints[-1].file, memoryview(payload.numpy()))
            plain = work_dir / f"plain-{n_params}-0.bin"
            plain_write(plain, memoryview(payload.numpy()))

            def ours_save(step: int) -> None:
                manager.wait_for_cleanup()  # the previous checkpoint is gone (keep_last=1), nothing dirty
                os.sync()
                save.append(timed(lambda: manager.checkpoint(step, model, optimizer)))

            def plain_save(step: int) -> None:
                nonlocal plain
                plain.unlink()  # the same starting point: previous file deleted, nothing dirty
                plain = work_dir / f"plain-{n_params}-{step}.bin"
                os.sync()
                write.append(timed(lambda: plain_write(plain, memoryview(payload.numpy()))))

            for step in range(1, repeats + 1):
                first, second = (ours_save, plain_save) if step % 2 else (plain_save, ours_save)
                first(step)
                second(step)
                drop_from_page_cache(manager.root / manager.checkpoints[-1].file)
                load.append(timed(lambda: manager.restore_latest(model, optimizer)))
                drop_from_page_cache(plain)
                read.append(timed(lambda: plain_read(plain, memoryview(payload.numpy()))))
            plain.unlink()
            del payload
        rows[f"durable save{suffix}"] = (best(save), best(write), None)
        rows[f"durable restore{suffix}"] = (best(load), best(read), None)
    rows["_bytes"] = (float(nbytes), float(file_bytes), float(params))
    return rows


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f} ms"


def report(n_params: int, rows: Rows) -> list[tuple[str, float, float, bool]]:
    nbytes, file_bytes, params = rows["_bytes"]
    print(
        f"\n== {int(params) / 1e6:.1f}M parameters, fp32 + Adam: {nbytes / 2**20:.0f} MiB of state, "
        f"checkpoint file {file_bytes / 2**20:.0f} MiB =="
    )
    header = (
        f"{'operation':<24} {'tolaria':>12} {'floor/plain':>12} {'ratio':>7} {'GiB/s':>7} "
        f"{'prototype':>12} {'speed-up':>9}"
    )
    print(header)
    print("-" * len(header))
    checks = []
    for name in [k for k in rows if not k.startswith("_")]:
        ours, floor, proto = rows[name]
        size = file_bytes if name.startswith("durable") else nbytes
        proto_text = fmt_time(proto) if proto is not None else f"{'-':>12}"
        speedup = f"{proto / ours:8.1f}x" if proto is not None else f"{'-':>9}"
        print(
            f"{name:<24} {fmt_time(ours):>12} {fmt_time(floor):>12} {ours / floor:6.2f}x {size / ours / 2**30:7.2f} "
            f"{proto_text:>12} {speedup}"
        )
    ours, floor, proto = rows["fast restore"]
    checks.append((f"{n_params // 10**6}M fast restore <= 1.5x copy floor", ours / floor, 1.5, ours / floor <= 1.5))
    checks.append(
        (f"{n_params // 10**6}M fast restore >= 10x faster than prototype", proto / ours, 10.0, proto / ours >= 10)
    )
    for name in [k for k in rows if k.startswith("durable save")]:
        ours, floor, _ = rows[name]
        label = f"{n_params // 10**6}M {name} <= 1.5x plain write+fsync"
        checks.append((label, ours / floor, 1.5, ours / floor <= 1.5))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10M,100M", help="comma-separated parameter counts (e.g. 10M,100M)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (best is kept)")
    parser.add_argument(
        "--checksums",
        default=None,
        help="checksums to time the durable tier with, the first as the main row "
        "(default: crc32,sha256 below 50M parameters, crc32 from 50M)",
    )
    parser.add_argument("--dir", default=None, help="folder for checkpoint files (default: a temporary folder)")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    print(
        f"tolaria.state rollback benchmark -- torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, best of {args.repeats}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    checks = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="tolaria-rollback-bench-") as tmp:
        print(f"checkpoint folder: {tmp}")
        for n in sizes:
            default = "crc32,sha256" if n < 50_000_000 else "crc32"
            checksums = [c.strip() for c in (args.checksums or default).split(",") if c.strip()]
            rows = bench_size(n, args.repeats, Path(tmp), checksums)
            checks.extend(report(n, rows))
            gc.collect()
    print("\ntargets:")
    for name, value, target, ok in checks:
        print(f"  {name:<56} {value:7.2f}x (target {target:g}x)  {'MET' if ok else 'MISSED'}")
    return 0


# ---- pytest-benchmark form ----------------------------------------------------------------------

BENCH_PARAMS = parse_size(os.environ.get("TOLARIA_BENCH_PARAMS", "10M"))
_medians: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def rollback_case(tmp_path_factory):
    """The model, its optimizer, a fast-tier manager holding one snapshot, and the floor's buffers."""
    work_dir = tmp_path_factory.mktemp("tolaria-rollback-bench")
    model, optimizer = build(BENCH_PARAMS)
    nbytes = state_nbytes(model, optimizer)
    cache_mb = nbytes * 1.05 / (1 << 20) + 1
    with StateManager(
        work_dir / "fast", fast_cache_mb=cache_mb, keep_last=1, telemetry=TelemetryEmitter([MemorySink()])
    ) as manager:
        manager.snapshot(0, model, optimizer)  # warm-up, and the snapshot fast restore rolls back to
        assert manager.rollback(0, model, optimizer, deadline_s=600).ok
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        yield {"dir": work_dir, "model": model, "optimizer": optimizer, "manager": manager, "src": src}


def _fast_restore(manager: StateManager, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    result = manager.rollback(0, model, optimizer, deadline_s=600)
    assert result.ok and result.tier == "fast", result


def _durable(case: dict, impl: str) -> tuple[Callable[[], object], Callable[[], None]]:
    """(timed save, untimed setup): the previous file of that kind deleted and ``os.sync()`` run."""
    model, optimizer = case["model"], case["optimizer"]
    manager = StateManager(
        case["dir"] / f"durable-{impl}", fast_cache_mb=0, keep_last=1, telemetry=TelemetryEmitter([MemorySink()])
    )
    case.setdefault("closers", []).append(manager.close)
    manager.checkpoint(0, model, optimizer)  # warm-up
    if impl == "tolaria":
        steps = iter(range(1, 1 << 30))

        def setup() -> None:
            manager.wait_for_cleanup()  # the previous checkpoint is gone (keep_last=1), nothing dirty
            os.sync()

        return (lambda: manager.checkpoint(next(steps), model, optimizer)), setup
    payload = torch.empty(manager.checkpoints[-1].nbytes, dtype=torch.uint8)
    plain_read(manager.root / manager.checkpoints[-1].file, memoryview(payload.numpy()))
    plain = case["dir"] / "plain.bin"

    def setup_plain() -> None:
        plain.unlink(missing_ok=True)
        os.sync()

    return (lambda: plain_write(plain, memoryview(payload.numpy()))), setup_plain


@pytest.mark.parametrize("impl", ["floor", "tolaria"])  # the floor first: the ratio's base
@pytest.mark.parametrize("operation", ["snapshot", "fast restore", "durable save"])
def test_rollback(benchmark, rollback_case, operation, impl):
    case = rollback_case
    model, optimizer, manager, src = case["model"], case["optimizer"], case["manager"], case["src"]
    setup = None
    if operation == "snapshot":
        fn = (lambda: src.clone()) if impl == "floor" else (lambda: manager.snapshot(0, model, optimizer))
    elif operation == "fast restore":
        dst = torch.empty_like(src).fill_(0)
        fn = (lambda: dst.copy_(src)) if impl == "floor" else (lambda: _fast_restore(manager, model, optimizer))
    else:
        fn, setup = _durable(case, impl)
    params = sum(p.numel() for p in model.parameters())
    benchmark.group = f"{operation}, {params / 1e6:.1f}M parameters fp32 + Adam ({cpu_isa()})"
    try:
        if setup is None:
            fn()  # warm-up
            benchmark.pedantic(fn, rounds=5, iterations=1)
        else:
            benchmark.pedantic(fn, setup=setup, rounds=5, iterations=1)
    finally:
        for close in case.pop("closers", []):
            close()
    median = benchmark.stats.stats.median
    _medians[(operation, impl)] = median
    if impl == "tolaria" and (operation, "floor") in _medians:
        benchmark.extra_info["x_floor"] = median / _medians[(operation, "floor")]


if __name__ == "__main__":
    raise SystemExit(main())
