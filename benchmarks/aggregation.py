"""Aggregation throughput, side by side: Tolaria, the naive PCGrad loop, TorchJD, and the floor.

    python benchmarks/aggregation.py --quick          # K=8, N=4e6, fp32 (the headline figure)
    python benchmarks/aggregation.py                  # the full grid (K 2..16, N 1e5..1.6e7, fp32/bf16)
    python benchmarks/aggregation.py --device cuda    # on a GPU (Triton path, plus the copy bandwidth)

Same as ``tolaria bench``; see ``tolaria/bench.py`` for what each column means.
"""

import sys

from tolaria.bench import main

if __name__ == "__main__":
    sys.exit(main())
