"""Runs the randomised fault of issue 18 many times and reports the outcome.

A rank SIGKILLed at a random step under ``torchrun --nproc-per-node 2 --max-restarts 1`` (gloo):
each repetition draws the step and the rank from ``random.Random(--seed)``, runs one torchrun
launch (``tests/distributed/kill_worker.py``) and checks it: nothing lost (final parameters bitwise
equal to the uninterrupted run's, resumed from the newest committed checkpoint), no hang (a launch
past ``--timeout`` counts as one), no crash (a worker ending other than by the fault), identical
replicas.

    python tools/fault_repeat.py --repeats 20 --seed 18 --out /tmp/faults

Prints one line per repetition and a summary; exits 1 if any repetition failed. CI runs two of
them (``tests/distributed/test_rank_killed.py``; ``TOLARIA_FAULT_REPEATS=20`` runs 20 there too).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the worker lives with the tests

from distributed import kill_worker  # noqa: E402

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a launch counts as a hang")
    parser.add_argument("--out", type=Path, required=True, help="a folder for the runs (one subfolder each)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    failures, records = 0, []
    for i in range(args.repeats):
        kill_step, kill_rank = kill_worker.draw_fault(rng)
        out = args.out / f"rep{i:02d}"
        run = kill_worker.launch(out, kill_step, kill_rank, timeout_s=args.timeout)
        found = kill_worker.problems(run, out)
        failures += bool(found)
        (out / "torchrun.log").write_text(run.output)
        records.append(
            {
                "repetition": i,
                "kill_step": kill_step,
                "kill_rank": kill_rank,
                "wall_s": round(run.wall_s, 1),
                "problems": found,
            }
        )
        verdict = "ok" if not found else "FAILED: " + "; ".join(found)
        print(f"{i:2d}: kill rank {kill_rank} after step {kill_step:2d}: {verdict} ({run.wall_s:.1f} s)", flush=True)
    (args.out / "summary.json").write_text(json.dumps(records, indent=1))
    print(f"{args.repeats - failures} of {args.repeats} repetitions ok; details in {args.out}/summary.json")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
