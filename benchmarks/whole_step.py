"""The whole multi-task training step, not just the aggregation: every way of taking one step on
three trunks with K = 2, 4, 8 linear heads, timed side by side and as ratios to a plain step.

    python benchmarks/whole_step.py                                # the table (a few minutes on 2 cores)
    python benchmarks/whole_step.py --trunks mlp --ks 8 --rounds 5
    python -m pytest benchmarks/whole_step.py --benchmark-only     # pytest-benchmark, every case

Trunks (float32, CPU): ``mlp`` 4.2M parameters (1024 -> 1600 -> 1600), batch 256; ``cnn`` 1.1M
parameters (four 3x3 convolutions, stride 2 in the first three, 64-128-256-256 channels, global
average pool, a 256 -> 512 linear layer) on 32x32x3 images, batch 128; ``transformer`` two encoder
layers d=256, 4 heads, feed-forward 1024 (1.6M), 32 sequences of 64 tokens, mean-pooled. K linear
heads of 10 classes on the trunk's output; SGD without momentum (no optimizer state).

Steps (each ``zero_grad``, forward, the K losses, the gradient, ``optimizer.step()``):

- ``plain``: ``backward`` of the summed loss: the floor every row is divided by;
- ``k_backward``: K backward passes through the trunk (``retain_graph``), accumulating in ``.grad``;
  with ``copy_J`` (one read and one write of a K x N float32 tensor, timed alone) the bound of an
  exact per-parameter aggregation;
- ``buffer``: ``GradientBuffer(model, K, shared=trunk)`` + ``UPGrad``, Tolaria's default mode;
- ``low_memory``: the same with ``mode="low_memory"`` (the Gram folded during one batched backward);
- ``features``: ``level="features"``, the per-source gradients at the trunk's output (an approximation);
- ``torchjd``: TorchJD's ``mtl_backward(losses, features)`` + ``jac_to_grad(shared, UPGrad())``;
- ``pytorch_pcgrad``: Pytorch-PCGrad's ``pc_backward`` (its algorithm, PCGrad over every parameter,
  as tests/compat/reference_pcgrad.py reimplements it).

A step whose library or mode is missing prints why instead of a figure.

Time: the median of ``--rounds`` interleaved steps per case (benchmarks/_e2e_models.interleaved_medians_ms).
Peak memory: the tensor bytes allocated (and not yet freed) while building the step's machinery
(optimizer, buffer, hooks) and running two steps, over the model and the batch (built before), from
``torch.profiler``'s memory events (tolaria.trainer.peak_memory); the K x N buffer, ``.grad``, the
activations and every temporary count, on the thread that runs the step.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tolaria.aggregation import GradientBuffer, UPGrad, cpu_isa
from tolaria.trainer.peak_memory import measure_peak_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' reference
from _e2e_models import interleaved_medians_ms  # noqa: E402
from compat.reference_pcgrad import ReferencePCGrad  # noqa: E402

TRUNKS = ("mlp", "cnn", "transformer")
KS = (2, 4, 8)
STEPS = ("plain", "k_backward", "buffer", "low_memory", "features", "torchjd", "pytorch_pcgrad")
BATCH = {"mlp": 256, "cnn": 128, "transformer": 32}
SEQ = 64
CLASSES = 10


class Unavailable(Exception):
    """This step cannot run here (a library or a mode is missing); the message says why."""


# ---- trunks -------------------------------------------------------------------------------------


class MeanPooledEncoder(nn.Module):
    def __init__(self, d: int = 256, layers: int = 2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x).mean(dim=1)


def make_trunk(name: str) -> tuple[nn.Module, int]:
    """The trunk and the width of its output (the features)."""
    if name == "mlp":
        return nn.Sequential(nn.Linear(1024, 1600), nn.ReLU(), nn.Linear(1600, 1600), nn.ReLU()), 1600
    if name == "cnn":
        channels = (3, 64, 128, 256)
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(channels, channels[1:]):
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
        blocks += [nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        blocks += [nn.Linear(256, 512), nn.ReLU()]
        return nn.Sequential(*blocks), 512
    if name == "transformer":
        return MeanPooledEncoder(), 256
    raise ValueError(f"unknown trunk {name!r}; the trunks are {', '.join(TRUNKS)}")


class MultiHead(nn.Module):
    def __init__(self, trunk: str, k: int):
        super().__init__()
        torch.manual_seed(0)
        self.trunk, width = make_trunk(trunk)
        self.heads = nn.ModuleList(nn.Linear(width, CLASSES) for _ in range(k))


def trunk_parameters(trunk: str) -> int:
    return sum(p.numel() for p in make_trunk(trunk)[0].parameters())


def make_batch(trunk: str, k: int) -> tuple[Tensor, list[Tensor]]:
    g = torch.Generator().manual_seed(1)
    n = BATCH[trunk]
    shape = {"mlp": (n, 1024), "cnn": (n, 3, 32, 32), "transformer": (n, SEQ, 256)}[trunk]
    return torch.randn(*shape, generator=g), [torch.randint(0, CLASSES, (n,), generator=g) for _ in range(k)]


# ---- steps --------------------------------------------------------------------------------------


def _losses(model: MultiHead, features: Tensor, ys: list[Tensor]) -> list[Tensor]:
    return [F.cross_entropy(head(features), y) for head, y in zip(model.heads, ys)]


def _tolaria_buffer(model: MultiHead, k: int, **mode: str) -> GradientBuffer:
    try:
        return GradientBuffer(model, num_sources=k, shared=model.trunk, **mode)
    except (TypeError, ValueError, ImportError) as exc:  # the mode is not in this tree (yet)
        raise Unavailable(f"GradientBuffer(..., {mode}) failed: {exc}") from exc


def build_step(name: str, model: MultiHead, x: Tensor, ys: list[Tensor]) -> Callable[[], None]:
    """The step closure of ``name`` over ``model`` (builds the optimizer and any buffer)."""
    k = len(ys)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    shared = list(model.trunk.parameters())

    if name == "plain":

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.stack(_losses(model, model.trunk(x), ys)).sum().backward()
            optimizer.step()

    elif name == "k_backward":

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            losses = _losses(model, model.trunk(x), ys)
            for i, loss in enumerate(losses):
                loss.backward(retain_graph=i < k - 1)
            optimizer.step()

    elif name in ("buffer", "low_memory", "features"):
        options = {"buffer": {}, "low_memory": {"mode": "low_memory"}, "features": {"level": "features"}}[name]
        buffer = _tolaria_buffer(model, k, **options)
        aggregator = UPGrad(reg_eps=1e-4, norm_eps=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            buffer.zero_grad()
            features = model.trunk(x)
            losses = _losses(model, features, ys)
            if name == "features":
                buffer.backward(losses, features=features)
            else:
                buffer.backward(losses)
            buffer.aggregate(aggregator)
            optimizer.step()

    elif name == "torchjd":
        try:
            from torchjd.aggregation import UPGrad as JDUPGrad
            from torchjd.autojac import jac_to_grad, mtl_backward
        except ImportError as exc:
            raise Unavailable(f"torchjd is not installed ({exc}); pip install torchjd") from exc
        jd_aggregator = JDUPGrad()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            features = model.trunk(x)
            mtl_backward(_losses(model, features, ys), features)
            jac_to_grad(shared, jd_aggregator)
            optimizer.step()

    elif name == "pytorch_pcgrad":
        wrapper = ReferencePCGrad(optimizer)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            wrapper.pc_backward(_losses(model, model.trunk(x), ys))
            wrapper.step()

    else:
        raise ValueError(f"unknown step {name!r}; the steps are {', '.join(STEPS)}")
    return step


def copy_j_step(trunk: str, k: int) -> Callable[[], None]:
    """One read and one write of a K x N float32 tensor (N: the trunk's parameters)."""
    n = trunk_parameters(trunk)
    src, dst = torch.ones(k, n), torch.empty(k, n)

    def step() -> None:
        dst.copy_(src)

    return step


def low_memory_estimate(trunk: str, k: int) -> str:
    """What the low-memory mode predicts before a step (``measure_forward`` + ``memory_estimate``)."""
    import warnings

    model = MultiHead(trunk, k)
    x, ys = make_batch(trunk, k)
    buffer = _tolaria_buffer(model, k, mode="low_memory")
    with buffer.measure_forward():
        features = model.trunk(x)
    with warnings.catch_warnings():  # the estimate's RuntimeWarning says what its message says
        warnings.simplefilter("ignore", RuntimeWarning)
        buffer.backward(_losses(model, features, ys))
    estimate = buffer.memory_estimate
    verdict = "saves" if estimate.saves else "would not save"
    return (
        f"estimate: {verdict} (low_memory {estimate.low_memory_bytes / 2**20:.1f} MiB "
        f"against buffer {estimate.buffer_bytes / 2**20:.1f} MiB)"
    )


def peak_step_memory(name: str, trunk: str, k: int) -> int:
    """Peak tensor bytes of building ``name``'s step and running it twice, over model and batch."""
    model = MultiHead(trunk, k)
    x, ys = make_batch(trunk, k)
    random.seed(0)

    def work() -> None:
        step = build_step(name, model, x, ys)
        step()
        step()

    return measure_peak_memory(work)[1]


# ---- the table ----------------------------------------------------------------------------------


def measure_case(trunk: str, k: int, steps: tuple[str, ...], rounds: int, memory: bool) -> dict[str, dict]:
    """Per step name: {"ms", "peak"} or {"why"}; plus "copy_J" {"ms"}."""
    x, ys = make_batch(trunk, k)
    closures: dict[str, Callable[[], None]] = {}
    rows: dict[str, dict] = {}
    for name in steps:
        try:
            closures[name] = build_step(name, MultiHead(trunk, k), x, ys)
        except Unavailable as exc:
            rows[name] = {"why": str(exc)}
    closures["copy_J"] = copy_j_step(trunk, k)
    random.seed(0)
    for name, ms in interleaved_medians_ms(closures, rounds).items():
        rows.setdefault(name, {})["ms"] = ms
    if memory:
        for name in closures:
            if name != "copy_J":
                rows[name]["peak"] = peak_step_memory(name, trunk, k)
    if "ms" in rows.get("low_memory", {}):
        rows["low_memory"]["estimate"] = low_memory_estimate(trunk, k)
    return rows


def format_case(trunk: str, k: int, rows: dict[str, dict]) -> list[str]:
    plain = rows["plain"]
    bound = rows["k_backward"]["ms"] + rows["copy_J"]["ms"] if "ms" in rows.get("k_backward", {}) else None
    peak = f", peak {plain['peak'] / 2**20:.1f} MiB" if "peak" in plain else ""
    lines = [
        f"{trunk} ({trunk_parameters(trunk) / 1e6:.1f}M, batch {BATCH[trunk]}) K={k}: plain {plain['ms']:.1f} ms"
        f"{peak}; copy_J {rows['copy_J']['ms']:.1f} ms"
        + (f"; bound (k_backward + copy_J) {bound:.1f} ms" if bound else "")
    ]
    for name, row in rows.items():
        if name == "copy_J":
            continue
        if "why" in row:
            lines.append(f"    {name:15s} n/a: {row['why']}")
            continue
        text = f"    {name:15s} {row['ms']:9.1f} ms  x{row['ms'] / plain['ms']:5.2f} time"
        if "peak" in row:
            text += f"  {row['peak'] / 2**20:8.1f} MiB  x{row['peak'] / plain['peak']:5.2f} memory"
        if bound and name == "buffer":
            text += f"  (x{row['ms'] / bound:.2f} of the bound)"
        if "peak" in row and name == "low_memory" and "peak" in rows.get("buffer", {}):
            text += f"  (x{row['peak'] / rows['buffer']['peak']:.2f} of buffer's memory)"
        if "estimate" in row:
            text += f"\n{'':20s}{row['estimate']}"
        lines.append(text)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trunks", default=",".join(TRUNKS))
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--steps", default=",".join(STEPS), help="which steps (plain and k_backward always run)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per case (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads (default torch's; 1 on a VM whose cores are shared)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    chosen = tuple(dict.fromkeys(["plain", "k_backward", *args.steps.split(",")]))
    for name in chosen:
        if name not in STEPS:
            parser.error(f"unknown step {name!r}; the steps are {', '.join(STEPS)}")
    print(
        f"whole step: torch {torch.__version__}, {platform.machine()}, CPU ISA {cpu_isa()}, "
        f"{torch.get_num_threads()} threads, float32; median of {args.rounds} interleaved steps; "
        "ratios to the plain step (summed loss)"
    )
    for trunk in args.trunks.split(","):
        for k in map(int, args.ks.split(",")):
            rows = measure_case(trunk, k, chosen, args.rounds, not args.no_memory)
            print("\n".join(format_case(trunk, k, rows)), flush=True)


# ---- pytest-benchmark ---------------------------------------------------------------------------

CASES = [(t, k) for t in TRUNKS for k in KS]


@pytest.mark.parametrize("name", STEPS)  # plain first: the ratios' base
@pytest.mark.parametrize("trunk,k", CASES, ids=[f"{t}-K{k}" for t, k in CASES])
def test_whole_step(benchmark, trunk, k, name):
    benchmark.group = f"whole step, {trunk}, K={k}, CPU ({cpu_isa()})"
    x, ys = make_batch(trunk, k)
    random.seed(0)
    try:
        step = build_step(name, MultiHead(trunk, k), x, ys)
    except Unavailable as exc:
        pytest.skip(str(exc))
    step()  # warm-up: allocations, the buffer, the compiled kernels' first call
    benchmark.pedantic(step, rounds=3, iterations=1)
    benchmark.extra_info["peak_step_bytes"] = peak_step_memory(name, trunk, k)


if __name__ == "__main__":
    main()
