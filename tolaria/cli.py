"""The ``tolaria`` command: ``tolaria train``, ``tolaria bench``, ``tolaria report`` and ``tolaria compare``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

# Each subcommand: the module that gives its add_arguments(parser) and run(args), its one-line help and
# its description. Adding a command is one module and one entry here.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": (
        "tolaria.trainer.command",
        "train the embedded two-digit task (PCGrad, CPU), with faults to demonstrate recovery",
        "With no arguments: two handwritten digits side by side (scikit-learn's bundled digits), one head "
        "per digit, PCGrad, on the CPU, with a progress bar and a summary table. "
        "--inject-fault nan|hang-policy|kill shows a NaN rollback, a hung policy timing out, or a crash "
        "and --resume.",
    ),
    "bench": (
        "tolaria.bench",
        "benchmark the aggregators side by side (Tolaria, the naive loop, TorchJD, the floor)",
        "Times every aggregator against the alternatives on the same matrices, in one process.",
    ),
    "report": (
        "tolaria.trainer.report",
        "draw PNG plots of a run's telemetry (losses, learning rate, conflict rate, cosine heatmap)",
        "Reads RUN_DIR/telemetry.jsonl and writes PNG plots to RUN_DIR/report (or --out).",
    ),
    "compare": (
        "tolaria.trainer.compare",
        "train a task with several aggregators over several seeds; table of accuracy, time, memory; one PNG",
        "Trains --task with each of --aggregators on seeds 0..N-1 (real trainer runs, in this process), prints "
        "per-source held-out accuracy (mean ± std over seeds), step time, peak memory and conflict rate, and "
        "draws the curves to OUT/compare.png.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tolaria",
        description="Conflict-aware multi-source gradient aggregation and a training loop built to survive.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text, description) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=description)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
