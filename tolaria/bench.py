"""The aggregation benchmark behind ``tolaria bench`` and ``benchmarks/aggregation.py``.

For each (dtype, K, N) it builds one K x N matrix and times, in the same process on the same matrix:

- ``tolaria``: the aggregator on its default backend (compiled CPU path, or Triton on CUDA);
- ``tolaria-torch``: the same aggregator on the plain-PyTorch backend;
- ``naive-loop``: the common PyTorch PCGrad recipe, a Python loop over pairs (PCGrad only);
- ``torchjd``: TorchJD's aggregator of the same name, when TorchJD is installed;
- ``floor``: one read of the matrix (``J.sum(0)``): no aggregator can beat it; on CUDA also
  ``copy``, a ``clone`` of J, the device's measured copy bandwidth.

Methods are timed in turns (each round calls every method once), so that a machine whose speed
drifts during a case (a shared VM) affects every method alike. It prints median time, effective
bandwidth (bytes of J read once, divided by the time), the ratio to the floor and Tolaria's
speed-up over each alternative, and the peak memory each method needed beyond
its input. On CUDA it adds the physical reference: ``pass GB/s`` counts two J's worth of bytes per
call (Tolaria's two passes read J twice; ``copy`` reads J and writes it once), and ``x copy`` is that
bandwidth as a fraction of the copy's, i.e. copy time / method time. A summary line per case states
Tolaria's fraction of the copy bandwidth and its speed-ups.

On CUDA the defaults are K in 2, 4, 8, 16, 32 and N in 1e6, 1e7, 1e8, 1e9 (cases that do not fit in
memory are skipped), the aggregators skip the finiteness check (``--nonfinite propagate``: the check
reads K values on the host, a device sync per step), and the naive loop only runs up to
``--naive-max`` elements (K x N) to keep the run short.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tolaria.aggregation import cpu_isa, set_cpu_isa
from tolaria.aggregation.engine import NONFINITE_MODES, check_nonfinite_mode
from tolaria.bench_contenders import (  # re-exported: the table and TorchJD's construction live there
    _WEIGHTING,  # noqa: F401
    CONTENDERS,
    K_SOURCES,
    Contender,
    _torchjd,
    _torchjd_weighting,  # noqa: F401
    naive_pcgrad,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class Measurement:
    aggregator: str
    method: str
    dtype: str
    k: int
    n: int
    device: str
    ms: float
    gb_per_s: float
    x_floor: float
    extra_mb: float | None
    x_copy: float | None = None  # CUDA: copy time / this method's time
    cpu_isa: str | None = None  # the compiled CPU passes' ISA level during the run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


EXTERNAL_METHODS = frozenset({"torchjd"})  # other libraries' code: a failure there leaves it out of the case


def _time_round_robin(
    methods: dict[str, Callable[[], object]], device: torch.device, repeats: int, budget_s: float, label: str
) -> dict[str, float]:
    """Median milliseconds of each method, timed in turns (one call of each per round), so that a
    machine that speeds up or slows down during the case affects every method alike.

    Each method is called once first (compilation, caches, allocator). A method that runs out of GPU
    memory, or another library's method that fails, is left out with a note; rounds stop after
    ``repeats`` or once ``budget_s`` per method has been spent (at least one round)."""
    alive: dict[str, Callable[[], object]] = {}
    for m, fn in methods.items():
        if _call_or_note(m, fn, device, label):
            alive[m] = fn
    times: dict[str, list[float]] = {m: [] for m in alive}
    start = time.perf_counter()
    for _ in range(repeats):
        for m, fn in list(alive.items()):
            t0 = time.perf_counter()
            if not _call_or_note(m, fn, device, label):
                del alive[m], times[m]
                continue
            times[m].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s * max(1, len(alive)):
            break
    return {m: statistics.median(t) for m, t in times.items()}


def _call_or_note(m: str, fn: Callable[[], object], device: torch.device, label: str) -> bool:
    """Calls ``fn`` and waits for the device; False (with a printed note) where it could not run."""
    try:
        fn()
        _sync(device)
    except torch.cuda.OutOfMemoryError:
        # A large case may fit Tolaria but not an alternative that copies J: say so, go on.
        print(f"note: {label}: {m} ran out of GPU memory, left out")
        torch.cuda.empty_cache()
        return False
    except Exception as exc:
        if m not in EXTERNAL_METHODS:
            raise
        # Another library's failure (e.g. TorchJD's UPGrad on bfloat16) is its own: shown, not fatal.
        print(f"note: {label}: {m} failed and is left out: {type(exc).__name__}: {exc}")
        return False
    return True


_M_MMAP_THRESHOLD = -3


def _map_large_allocations() -> None:
    """Makes glibc serve every allocation over 64 KiB with its own mmap (Linux).

    Otherwise freed buffers are recycled from already-resident heap and a method's new allocations
    never show in the peak RSS; with this, each one is fresh memory that the peak counts.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    except OSError as exc:
        print(f"note: cannot tune malloc ({exc}); CPU memory figures may read low")


def _reset_peak_rss() -> int | None:
    """Resets the process's peak RSS (Linux) and returns the current RSS in bytes, or None.

    Free heap memory is first handed back to the kernel (``malloc_trim``), else a method could reuse
    pages that are already resident and its allocations would not show in the peak.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return None


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _extra_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory ``fn`` needs beyond what is already allocated (its input included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = _reset_peak_rss()
    if base is None:
        return None
    fn()
    return max(0, _status_kb("VmHWM") * 1024 - base) / 2**20


def build_methods(
    contender: Contender,
    dtype_name: str,
    k: int,
    n: int,
    device: torch.device,
    *,
    nonfinite: str | None = None,
    naive_max: float | None = None,
) -> tuple[int, dict[str, Callable[[], object]]]:
    """The input's size in bytes and every method to time on one shared K x N matrix.

    ``nonfinite`` overrides the aggregators' finiteness mode; the naive loop is left out when
    K x N exceeds ``naive_max``.
    """
    seed = k * 1_000_003 + n
    if device.type == "cuda":  # drawn on the device: N = 1e9 would take minutes on the host
        gen = torch.Generator(device=device).manual_seed(seed)
        j = torch.randn((k, n), generator=gen, device=device, dtype=DTYPES[dtype_name])
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        j = torch.randn((k, n), generator=gen, dtype=torch.float32).to(device=device, dtype=DTYPES[dtype_name])
    methods: dict[str, Callable[[], object]] = {"floor": lambda: j.sum(0)}
    if device.type == "cuda":
        methods["copy"] = lambda: j.clone()
    agg = contender.tolaria("auto")
    agg_torch = contender.tolaria("torch")
    if nonfinite is not None:
        agg.nonfinite = agg_torch.nonfinite = check_nonfinite_mode(nonfinite)
    methods["tolaria"] = lambda: agg(j)
    methods["tolaria-torch"] = lambda: agg_torch(j)
    if contender.naive is not None and (naive_max is None or k * n <= naive_max):
        methods["naive-loop"] = lambda: contender.naive(j)
    tjd = _torchjd(contender.torchjd_name, contender.torchjd_kwargs, k)
    if tjd is not None:
        methods["torchjd"] = lambda: tjd(j)
    return j.numel() * j.element_size(), methods


def measure(
    contender: Contender,
    dtype_name: str,
    k: int,
    n: int,
    device: torch.device,
    *,
    repeats: int,
    budget_s: float,
    nonfinite: str | None = None,
    naive_max: float | None = None,
) -> list[Measurement]:
    """Times every method on one matrix; ``extra_mb`` is filled in later by :func:`add_memory`."""
    nbytes, methods = build_methods(contender, dtype_name, k, n, device, nonfinite=nonfinite, naive_max=naive_max)
    times = _time_round_robin(methods, device, repeats, budget_s, f"{contender.name} {dtype_name} K={k} N={n:.3g}")
    if "floor" not in times or "tolaria" not in times:
        print(f"note: {contender.name} {dtype_name} K={k} N={n:.3g}: case skipped (floor or tolaria did not fit)")
        return []
    copy_ms = times.get("copy")
    return [
        Measurement(
            aggregator=contender.name,
            method=m,
            dtype=dtype_name,
            k=k,
            n=n,
            device=str(device),
            ms=ms,
            gb_per_s=nbytes / (ms * 1e-3) / 1e9,
            x_floor=ms / times["floor"],
            extra_mb=None,
            x_copy=None if copy_ms is None else copy_ms / ms,
        )
        for m, ms in times.items()
    ]


def add_memory(
    group: list[Measurement],
    contender: Contender,
    device: torch.device,
    *,
    nonfinite: str | None = None,
    naive_max: float | None = None,
) -> None:
    """Fills in each method's peak extra memory, measured apart from the timings (see below)."""
    first = group[0]
    _, methods = build_methods(
        contender, first.dtype, first.k, first.n, device, nonfinite=nonfinite, naive_max=naive_max
    )
    for r in group:
        try:
            r.extra_mb = _extra_memory_mb(methods[r.method], device)
        except torch.cuda.OutOfMemoryError:
            print(
                f"note: {r.aggregator} {r.dtype} K={r.k} N={r.n:.3g}: {r.method} ran out of GPU memory "
                "while measuring its memory; shown as n/a"
            )
            torch.cuda.empty_cache()


def format_table(rows: list[Measurement]) -> str:
    """One block per (aggregator, dtype, K, N): each method's time, GB/s, x floor and Tolaria's speed-up."""
    out = []
    header = f"{'method':<14} {'ms':>10} {'GB/s':>8} {'x floor':>8} {'tolaria faster':>15} {'extra MB':>9}"
    groups: dict[tuple, list[Measurement]] = {}
    for r in rows:
        groups.setdefault((r.aggregator, r.dtype, r.k, r.n, r.device), []).append(r)
    for (agg, dt, k, n, dev), group in groups.items():
        tol = next(r.ms for r in group if r.method == "tolaria")
        with_copy = any(r.x_copy is not None for r in group)
        out.append(f"\n{agg}  {dt}  K={k}  N={n:.3g}  ({dev})")
        out.append(header + (f" {'pass GB/s':>10} {'x copy':>7}" if with_copy else ""))
        for r in group:
            speed = "" if r.method in ("tolaria", "floor", "copy") else f"{r.ms / tol:.2f}x"
            mem = "n/a" if r.extra_mb is None else f"{r.extra_mb:.1f}"
            line = f"{r.method:<14} {r.ms:>10.3f} {r.gb_per_s:>8.2f} {r.x_floor:>8.2f} {speed:>15} {mem:>9}"
            if with_copy:
                line += f" {2 * r.gb_per_s:>10.1f} {r.x_copy:>7.2f}"
            out.append(line)
        if with_copy:
            out.append(_copy_summary(group))
    return "\n".join(out)


def _copy_summary(group: list[Measurement]) -> str:
    """One line: Tolaria's two passes against the copy bandwidth, and its speed-ups."""
    by = {r.method: r for r in group}
    tol, copy = by["tolaria"], by["copy"]
    ups = ", ".join(
        f"{by[m].ms / tol.ms:.1f}x {label}"
        for m, label in (("tolaria-torch", "torch path"), ("naive-loop", "naive loop"), ("torchjd", "TorchJD"))
        if m in by
    )
    return (
        f"=> tolaria: 2 reads of J at {2 * tol.gb_per_s:.0f} GB/s = {100 * tol.x_copy:.0f}% of the copy "
        f"bandwidth ({2 * copy.gb_per_s:.0f} GB/s, clone of J: read + write); {ups}"
    )


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--aggregators", default="pcgrad", help=f"comma list of {', '.join(CONTENDERS)}, or all (default: pcgrad)"
    )
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16, fp64 (default: fp32,bf16)")
    p.add_argument("--k", default=None, help="numbers of sources (default: 2,4,8,16; on CUDA 2,4,8,16,32)")
    p.add_argument(
        "--n", default=None, help="elements per source (default: 1e5,1e6,4e6,1.6e7; on CUDA 1e6,1e7,1e8,1e9)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="timed rounds; each round calls every method once, in turn; the median is reported",
    )
    p.add_argument(
        "--budget-s", type=float, default=3.0, help="stop the rounds once this many seconds per method have been spent"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the headline case only: K=8, N=4e6, fp32 (on CUDA: K=8, N=1e8, bf16)",
    )
    p.add_argument(
        "--nonfinite",
        choices=NONFINITE_MODES,
        default=None,
        help="the aggregators' finiteness mode (default: their own, raise; on CUDA: propagate, sync-free)",
    )
    p.add_argument(
        "--naive-max",
        type=float,
        default=None,
        help="run the naive loop only up to this many elements K x N (default: no limit; on CUDA 8e9)",
    )
    p.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    p.add_argument(
        "--isa",
        default=None,
        help="run the compiled CPU passes at this ISA level (avx512, avx2, baseline; neon on aarch64; "
        "default: TOLARIA_CPU_ISA, else the widest this CPU supports)",
    )


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    names = [a.strip() for a in args.aggregators.split(",") if a.strip()]
    if names == ["all"]:
        names = list(CONTENDERS)
    unknown = [a for a in names if a not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown aggregator(s) {', '.join(unknown)}; valid: {', '.join(CONTENDERS)}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"unknown dtype(s) {', '.join(bad)}; valid: {', '.join(DTYPES)}")
    cuda = device.type == "cuda"
    ks = _ints(args.k or ("2,4,8,16,32" if cuda else "2,4,8,16"))
    ns = _ints(args.n or ("1e6,1e7,1e8,1e9" if cuda else "1e5,1e6,4e6,1.6e7"))
    nonfinite = args.nonfinite or ("propagate" if cuda else None)
    naive_max = args.naive_max if args.naive_max is not None else (8e9 if cuda else None)
    if args.quick:
        dtypes, ks, ns = (["bf16"], [8], [100_000_000]) if cuda else (["fp32"], [8], [4_000_000])
    if args.isa:
        try:
            set_cpu_isa(args.isa)
        except (ValueError, RuntimeError) as exc:
            raise SystemExit(f"--isa {args.isa}: {exc}") from None
    print(
        f"tolaria bench: torch {torch.__version__}, {platform.machine()}, "
        f"CPU ISA {cpu_isa() or 'none (no compiled extension)'}, "
        f"{torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + (f", nonfinite={nonfinite}" if nonfinite else "")
    )
    rows: list[Measurement] = []
    groups: list[tuple[Contender, list[Measurement]]] = []
    for name in names:
        for dt in dtypes:
            for k in ks:
                for n in ns:
                    if device.type == "cuda":
                        need = k * n * torch.tensor([], dtype=DTYPES[dt]).element_size() * 4
                        if need > torch.cuda.mem_get_info(device)[0]:
                            print(f"skip {name} {dt} K={k} N={n:.3g}: needs ~{need / 2**30:.1f} GiB")
                            continue
                    if k < CONTENDERS[name].min_k:
                        print(f"note: {name} K={k} left out: it needs K >= {CONTENDERS[name].min_k}")
                        continue
                    if CONTENDERS[name].naive is not None and naive_max is not None and k * n > naive_max:
                        print(f"note: {name} {dt} K={k} N={n:.3g}: naive loop skipped (K x N > {naive_max:.3g})")
                    group = measure(
                        CONTENDERS[name],
                        dt,
                        k,
                        n,
                        device,
                        repeats=args.repeats,
                        budget_s=args.budget_s,
                        nonfinite=nonfinite,
                        naive_max=naive_max,
                    )
                    if not group:
                        continue
                    for m in group:
                        m.cpu_isa = cpu_isa()
                    groups.append((CONTENDERS[name], group))
                    rows.extend(group)
                    if cuda and not args.no_memory:  # CUDA's allocator counts peaks without tuning
                        add_memory(group, CONTENDERS[name], device, nonfinite=nonfinite, naive_max=naive_max)
                    if args.no_memory or cuda:
                        print(format_table(group), flush=True)
    if not args.no_memory and not cuda:
        # Memory is measured after every timing: on CPU it needs malloc tuned in a way that slows
        # allocation, which must not leak into the times.
        _map_large_allocations()
        for contender, group in groups:
            add_memory(group, contender, device, nonfinite=nonfinite, naive_max=naive_max)
            print(format_table(group), flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = [
    "CONTENDERS",
    "K_SOURCES",
    "Contender",
    "build_methods",
    "Measurement",
    "add_arguments",
    "format_table",
    "main",
    "measure",
    "naive_pcgrad",
    "run",
]
