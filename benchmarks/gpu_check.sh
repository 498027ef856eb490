#!/usr/bin/env bash
# The whole GPU check of the Triton aggregation path, as one command (at most about 8 minutes):
#
#     bash benchmarks/gpu_check.sh            # output also goes to $OUT (default: ./gpu_check_out)
#
# 0. the headline case alone (so it is measured whatever happens later);
# 1. GPU tests (tests/gpu): results match the torch path, the whole step records into a CUDA graph,
#    deterministic mode is bitwise reproducible;
# 2. the side-by-side benchmark (benchmarks/aggregation.py --device cuda): Tolaria's Triton path,
#    the torch path, the naive loop, TorchJD when installed, and the clone of J, for K 2..32 and N up
#    to 1e9 where memory allows; the headline is PCGrad, bf16, K=8, N=1e8 (target >= 70% of copy);
# 3. per-kernel bandwidth against the GPU's copy bandwidth (benchmarks/triton_kernels.py);
# 4. every other aggregator at the headline size;
# 5. the kernel tests (tests/kernels), compiled on the GPU, with the time that is left.
# Each step has a time cap, and none starts past GPU_CHECK_SECONDS (default 450) in total.
#
# Every step writes to the log file only (no pipes: a process a step leaves behind, such as a
# compile worker, can then never hold the check open), runs in its own process group, which is
# killed when the step ends or runs out of time, and its output is echoed to stdout afterwards.
# GPU_CHECK_DRY=1 runs the same plumbing on the CPU with tiny sizes (to check the script itself).
#
# It installs nothing: torch and triton must be present (pytest for steps 1 and 5, TorchJD optional).
# If tolaria is not installed, it imports the source tree, with ``tolaria.kernels`` mapped to
# ``kernels/`` the way the editable install maps it, so no C++ build is needed (the compiled CPU
# path is not part of this check).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: >"$LOG"
unset TRITON_INTERPRET  # set again below for a dry run only
export PYTHONUNBUFFERED=1
SECONDS=0
status=0

say() { echo "$@" | tee -a "$LOG"; }
TOTAL_S=${GPU_CHECK_SECONDS:-420}  # the whole check stays under this (plus start-up)
export TORCHINDUCTOR_COMPILE_THREADS=1  # no pool of compile workers outliving a step
next_log_line() { echo $(($(wc -l <"$LOG") + 1)); }  # where the next command's output starts

run() {  # run CAP_S LABEL CMD...: logged, limited to CAP_S and to what is left of TOTAL_S
    local limit=$1 label=$2
    shift 2
    local left=$((TOTAL_S - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        say ""
        say "!! $label: skipped, no time left"
        status=1
        return
    fi
    say ""
    say "== $label (limit ${limit}s, started at ${SECONDS}s)"
    local first
    first=$(next_log_line)
    # Own session and process group (setsid), output to the log file only; the whole group is
    # killed afterwards, whatever it left running.
    setsid timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 </dev/null &
    local pid=$!
    wait "$pid"
    local rc=$?
    kill -KILL -- "-$pid" 2>/dev/null
    tail -n "+$first" "$LOG"  # the step's output, echoed once it is over
    if [ "$rc" = 124 ] && [ "${OPTIONAL:-0}" = 1 ]; then
        say "(stopped at the time limit: this step only uses the time that is left)"
    elif [ "$rc" -ne 0 ]; then
        say "!! $label: exit status $rc$([ "$rc" = 124 ] && echo ' (time limit)')"
        status=1
    fi
}

quick() {  # quick CMD...: a short command (at most a minute), logged like a step, its status returned
    local first
    first=$(next_log_line)
    timeout --kill-after=5 60 "$@" >>"$LOG" 2>&1 </dev/null
    local rc=$?
    tail -n "+$first" "$LOG"
    return "$rc"
}

# The interpreter: python3 where there is no `python` (a symlink to a virtual environment's python
# would lose that environment, so the name is looked up, never linked).
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
python() { "$PYTHON" "$@"; }

DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" = 1 ]; then  # the plumbing only: CPU, tiny sizes
    export TRITON_INTERPRET=1
    DEV=cpu HEAD_N=1e5 GRID_K=2,8 GRID_N=1e4,1e5 KERNEL_N=1e4
else
    DEV=cuda HEAD_N=1e8 GRID_K=2,4,8,16,32 GRID_N=1e6,1e7,1e8,1e9 KERNEL_N=1e8
fi

say "== GPU check of the Triton aggregation path, $(date -u +%Y-%m-%dT%H:%MZ)"
quick nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
quick git -C "$ROOT" log -1 --format='commit %h %cd'
quick "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

# TOLARIA_SOURCE_TREE=1 imports the source tree even where some tolaria is installed.
if [ "${TOLARIA_SOURCE_TREE:-0}" = 1 ] || ! python -c "import tolaria.kernels" >/dev/null 2>&1; then
    SHIM=$(mktemp -d)
    cat >"$SHIM/_tolaria_source_tree.py" <<EOF
"""Imports tolaria from $ROOT, with tolaria.kernels -> kernels/ (as the editable install maps it)."""
import importlib.util
import sys

sys.path.insert(0, "$ROOT")


class _KernelsFinder:
    def find_spec(self, name, path=None, target=None):
        if name == "tolaria.kernels":
            return importlib.util.spec_from_file_location(
                name, "$ROOT/kernels/__init__.py", submodule_search_locations=["$ROOT/kernels"]
            )
        return None


sys.meta_path.insert(0, _KernelsFinder())
EOF
    export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    PRELUDE="import _tolaria_source_tree; "
    say "tolaria is not installed: importing the source tree at $ROOT (no build)"
else
    PRELUDE=""
fi
# PY runs a module (python -m), PYFILE a script, both with the prelude that makes tolaria importable.
PY=("$PYTHON" -c "${PRELUDE}import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")
PYFILE=("$PYTHON" -c "${PRELUDE}import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
if ! quick "$PYTHON" -c "${PRELUDE}import tolaria.kernels.gram, tolaria.aggregation.backends.triton"; then
    say "!! tolaria.kernels does not import: nothing to check"
    exit 1
fi
quick "$PYTHON" -c "from importlib.metadata import version; print('torchjd', version('torchjd'))"

HAVE_PYTEST=1
python -c "import pytest" >/dev/null 2>&1 || { HAVE_PYTEST=0; say "!! pytest is not installed: the tests (steps 1 and 4) cannot run"; status=1; }
PYTEST_ARGS=(-q -rfEs -p no:cacheprovider)

# 0. The headline first, so that it exists whatever happens later: PCGrad, bf16, K=8, N=1e8.
run 90 "headline: benchmarks/aggregation.py --device $DEV --quick" \
    "${PYFILE[@]}" "$ROOT/benchmarks/aggregation.py" --device "$DEV" --quick --repeats 10 --budget-s 2 \
    $([ "$DRY" = 1 ] && echo "--n $HEAD_N")

# 1. GPU tests.
if [ "$HAVE_PYTEST" = 1 ]; then
    run 180 "GPU tests: pytest tests/gpu" "${PY[@]}" pytest tests/gpu "${PYTEST_ARGS[@]}" --junitxml="$OUT/gpu_tests.xml"
fi

# 2. Side by side, K 2..32, N up to 1e9 where memory allows.
run 200 "side by side: benchmarks/aggregation.py --device $DEV" \
    "${PYFILE[@]}" "$ROOT/benchmarks/aggregation.py" --device "$DEV" --aggregators pcgrad --dtypes bf16,fp32 \
    --k "$GRID_K" --n "$GRID_N" --repeats 5 --budget-s 0.5 --json "$OUT/aggregation.json"

# 3. Each kernel against the copy bandwidth (where the time of a step goes).
run 60 "kernels: benchmarks/triton_kernels.py" "${PYFILE[@]}" "$ROOT/benchmarks/triton_kernels.py" --dtypes bf16,fp32 --k 2,8,32 --n "$KERNEL_N" --repeats 10

# 4. The other aggregators on the same passes, at the headline size.
run 60 "other aggregators: benchmarks/aggregation.py --device $DEV (K=8, N=$HEAD_N, bf16)" \
    "${PYFILE[@]}" "$ROOT/benchmarks/aggregation.py" --device "$DEV" --aggregators all --dtypes bf16 \
    --k 8 --n "$HEAD_N" --repeats 5 --budget-s 0.5 --json "$OUT/aggregation_all.json"

# 5. The interpreter's kernel tests, compiled for the GPU, in what is left of the budget.
if [ "$HAVE_PYTEST" = 1 ]; then
    OPTIONAL=1 run 600 "kernel tests on the GPU: pytest tests/kernels" "${PY[@]}" pytest tests/kernels "${PYTEST_ARGS[@]}" --junitxml="$OUT/kernel_tests.xml"
fi

# The headline block, ready for benchmarks/RESULTS.md (with the date and GPU from the log's top).
awk '/^== headline/{on=1; next} /^== /{on=0} on' "$LOG" >"$OUT/headline.txt"

say ""
say "== done in ${SECONDS}s, status $status; log: $LOG, headline: $OUT/headline.txt"
exit $status
