"""``tolaria report RUN_DIR``: PNG plots drawn from a run's ``telemetry.jsonl``.

Plots (matplotlib, Agg backend, no display needed):

- ``losses.png``: the training loss of each gradient source over the steps, with rollbacks marked,
  and the evaluation metrics per epoch when the run had any;
- ``lr.png``: the learning rate over the steps;
- ``conflicts.png``: PCGrad's conflict rate (conflicting projections per source pair) per logged step
  and per epoch;
- ``cosine.png``: a heatmap of the sources' mean pairwise cosine similarity over the run.

A plot whose data is absent (e.g. conflicts in a single-source run) is not drawn, and the reason is
returned and printed; a missing or unreadable telemetry file raises with its path and line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TELEMETRY_FILE = "telemetry.jsonl"
RANK0_FILE = "telemetry-rank0.jsonl"  # a distributed run's rank 0


@dataclass
class Report:
    """The plots written and the ones left out, with why."""

    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a telemetry JSONL file; a malformed line raises naming the file and line."""
    path = Path(path)
    if path.is_dir():
        # A distributed run writes one file per rank; rank 0's stands for the run (its losses are global).
        path = path / (
            TELEMETRY_FILE if (path / TELEMETRY_FILE).exists() or not (path / RANK0_FILE).exists() else RANK0_FILE
        )
    if not path.exists():
        raise FileNotFoundError(f"no telemetry at {path}; is this a run folder written by `tolaria train`?")
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno} is not valid JSON ({exc.msg}); the telemetry file is damaged"
                ) from None
            if not isinstance(record, dict) or "kind" not in record:
                raise ValueError(f"{path}:{lineno} is not a telemetry record (no 'kind')")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no telemetry records")
    return records


def _of_kind(records: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == kind]


def _series_by_source(records: list[dict[str, Any]], kind: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per source, (steps, values) in step order. Steps run again after a rollback or a resume:
    the later record of a step replaces the earlier one, so the line shows the run that counted."""
    latest: dict[str, dict[int, float]] = defaultdict(dict)
    for r in _of_kind(records, kind):
        if r.get("step") is None or not isinstance(r.get("value"), (int, float)):
            continue
        latest[str(r.get("source", kind))][int(r["step"])] = float(r["value"])
    return {source: (sorted(points), [points[s] for s in sorted(points)]) for source, points in latest.items()}


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> None:
    """Writes the figure as a PNG and frees it (a plot function returns None when it drew something)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return None


def _mark_rollbacks(ax, records: list[dict[str, Any]]) -> None:
    """Vertical lines where the run stepped back: rollbacks (red) and resumes from a checkpoint (grey)."""
    marks = (
        ("safety.rollback", "restored_step", "tab:red", "rollback"),
        ("train.resume", "restored_step", "tab:gray", "resume"),
    )
    for kind, key, color, label in marks:
        points = [r[key] for r in _of_kind(records, kind) if r.get(key) is not None and r.get("ok", True)]
        for i, step in enumerate(points):
            ax.axvline(step, color=color, linestyle=":", linewidth=1.2, label=label if i == 0 else None)


def plot_losses(records: list[dict[str, Any]], out: Path) -> str | None:
    series = _series_by_source(records, "train.loss")
    if not series:
        return "no train.loss records"
    epochs = [r for r in _of_kind(records, "train.epoch") if r.get("metrics")]
    plt = _figure()
    ncols = 2 if epochs else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    for source, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, label=source, linewidth=1.2)
    _mark_rollbacks(ax, records)
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Loss per gradient source")
    ax.set_yscale("log" if all(v > 0 for _, vs in series.values() for v in vs) else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
    if epochs:
        ax2 = axes[0][1]
        names = sorted({k for r in epochs for k in r["metrics"]})
        for name in names:
            xs = [r["epoch"] + 1 for r in epochs if name in r["metrics"]]
            ys = [r["metrics"][name] for r in epochs if name in r["metrics"]]
            ax2.plot(xs, ys, marker="o", label=name)
        ax2.set(xlabel="epoch", title="Evaluation metrics")
        ax2.xaxis.get_major_locator().set_params(integer=True)
        ax2.grid(alpha=0.3)
        ax2.legend()
    return _save(fig, out)


def plot_lr(records: list[dict[str, Any]], out: Path) -> str | None:
    points = [(r["step"], r["value"]) for r in _of_kind(records, "train.lr") if r.get("step") is not None]
    if not points:
        return "no train.lr records"
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    steps = [s for s, _ in points]
    first = points[0][1]
    if isinstance(first, list):
        for g in range(len(first)):
            ax.plot(steps, [v[g] for _, v in points], label=f"group {g}")
        ax.legend()
    else:
        ax.plot(steps, [v for _, v in points])
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_conflicts(records: list[dict[str, Any]], out: Path) -> str | None:
    series = _series_by_source(records, "gradient.conflict_rate").get("gradient.conflict_rate")
    if not series:
        return "no gradient.conflict_rate records (a single gradient source has no conflicts)"
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(*series, linewidth=0.8, alpha=0.6, label="logged step")
    epochs = [r for r in _of_kind(records, "train.epoch") if r.get("conflict_rate") is not None]
    if epochs:
        ax.plot([r["step"] for r in epochs], [r["conflict_rate"] for r in epochs], marker="o", label="epoch mean")
    _mark_rollbacks(ax, records)
    ax.set(
        xlabel="optimizer step", ylabel="conflicts per source pair", title="Gradient conflict rate", ylim=(-0.02, 1.02)
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def mean_cosine(records: list[dict[str, Any]]) -> tuple[list[str], list[list[float]]] | None:
    """The sources and their cosine matrix averaged over the run (epoch means weighted by steps)."""
    epochs = [r for r in _of_kind(records, "train.epoch") if r.get("cosine") and r.get("train_steps")]
    if epochs:
        names = epochs[-1]["sources"]
        k = len(names)
        total = sum(r["train_steps"] for r in epochs if r["sources"] == names)
        acc = [
            [
                sum(r["cosine"][i][j] * r["train_steps"] for r in epochs if r["sources"] == names) / total
                for j in range(k)
            ]
            for i in range(k)
        ]
        return names, acc
    steps = [r for r in _of_kind(records, "gradient.cosine") if isinstance(r.get("value"), list)]
    if not steps:
        return None
    names = steps[-1].get("sources") or [str(i) for i in range(len(steps[-1]["value"]))]
    k = len(names)
    same = [r for r in steps if len(r["value"]) == k]
    return names, [[sum(r["value"][i][j] for r in same) / len(same) for j in range(k)] for i in range(k)]


def plot_cosine(records: list[dict[str, Any]], out: Path) -> str | None:
    found = mean_cosine(records)
    if found is None or len(found[0]) < 2:
        return "no cosine matrix of two or more gradient sources in the telemetry"
    names, matrix = found
    plt = _figure()
    k = len(names)
    size = 1.2 * k + 3
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(2 * size + 1.5, size), gridspec_kw={"width_ratios": [1, 1.3]})
    im = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{matrix[i][j]:+.3f}", ha="center", va="center", fontsize=9)
    ax.set_title("Mean cosine similarity of the sources")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    # The mean hides how much the pairs swing between agreement and conflict: show them over time.
    steps: dict[int, list[list[float]]] = {}
    for r in _of_kind(records, "gradient.cosine"):
        if r.get("step") is not None and isinstance(r.get("value"), list) and len(r["value"]) == k:
            steps[int(r["step"])] = r["value"]
    xs = sorted(steps)
    for i in range(k):
        for j in range(i + 1, k):
            ax2.plot(xs, [steps[s][i][j] for s in xs], linewidth=0.9, label=f"{names[i]} / {names[j]}")
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set(xlabel="optimizer step", ylabel="cosine", title="Pairwise cosine per logged step (< 0: conflict)")
    ax2.grid(alpha=0.3)
    if xs:
        ax2.legend(fontsize=8)
    return _save(fig, out)


PLOTS = {
    "losses.png": plot_losses,
    "lr.png": plot_lr,
    "conflicts.png": plot_conflicts,
    "cosine.png": plot_cosine,
}


def make_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Draws every plot of ``run_dir``'s telemetry into ``out_dir`` (default ``RUN_DIR/report``)."""
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    out = Path(out_dir) if out_dir is not None else (run_dir if run_dir.is_dir() else run_dir.parent) / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    for name, plot in PLOTS.items():
        reason = plot(records, out / name)
        if reason is None:
            report.written.append(out / name)
        else:
            report.skipped[name] = reason
    return report


# ---- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holding telemetry.jsonl) or the file itself")
    parser.add_argument("--out", metavar="DIR", default=None, help="where the PNGs go (default RUN_DIR/report)")


def run(args: argparse.Namespace) -> int:
    try:
        report = make_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"tolaria report: error: {exc}", file=sys.stderr)
        return 2
    for path in report.written:
        print(f"wrote {path}")
    for name, reason in report.skipped.items():
        print(f"skipped {name}: {reason}")
    return 0 if report.written else 1


__all__ = ["PLOTS", "Report", "add_arguments", "load_records", "make_report", "mean_cosine", "run"]
