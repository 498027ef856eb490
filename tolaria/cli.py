"""The ``tolaria`` command: ``tolaria train``, ``tolaria bench``, ``tolaria report`` and ``tolaria compare``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from tolaria.bench import add_arguments, run

    p = sub.add_parser(
        "bench",
        help="benchmark the aggregators side by side (Tolaria, the naive loop, TorchJD, the floor)",
        description="Times every aggregator against the alternatives on the same matrices, in one process.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from tolaria.trainer.command import add_arguments, run

    p = sub.add_parser(
        "train",
        help="train the embedded two-digit task (PCGrad, CPU), with faults to demonstrate recovery",
        description=(
            "With no arguments: two handwritten digits side by side (scikit-learn's bundled digits), one head "
            "per digit, PCGrad, on the CPU, with a progress bar and a summary table. "
            "--inject-fault nan|hang-policy|kill shows a NaN rollback, a hung policy timing out, or a crash "
            "and --resume."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=run)


def _add_report(sub: argparse._SubParsersAction) -> None:
    from tolaria.trainer.report import add_arguments, run

    p = sub.add_parser(
        "report",
        help="draw PNG plots of a run's telemetry (losses, learning rate, conflict rate, cosine heatmap)",
        description="Reads RUN_DIR/telemetry.jsonl and writes PNG plots to RUN_DIR/report (or --out).",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from tolaria.trainer.compare import add_arguments, run

    p = sub.add_parser(
        "compare",
        help="train a task with several aggregators over several seeds; table of accuracy, time, memory; one PNG",
        description=(
            "Trains --task with each of --aggregators on seeds 0..N-1 (real trainer runs, in this process), prints "
            "per-source held-out accuracy (mean ± std over seeds), step time, peak memory and conflict rate, and "
            "draws the curves to OUT/compare.png."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tolaria",
        description="Conflict-aware multi-source gradient aggregation and a training loop built to survive.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_bench(sub)
    _add_report(sub)
    _add_compare(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
