"""The ``tolaria`` command: ``tolaria bench`` (and ``train`` / ``report`` where installed)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from tolaria.bench import add_arguments, run

    p = sub.add_parser(
        "bench",
        help="benchmark the aggregators side by side (Tolaria, the naive loop, TorchJD, the floor)",
        description="Times every aggregator against the alternatives on the same matrices, in one process.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tolaria",
        description="Conflict-aware multi-source gradient aggregation and a training loop built to survive.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
