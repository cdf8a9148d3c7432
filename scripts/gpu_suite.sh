#!/usr/bin/env bash
# The whole test suite on a CUDA machine (every test, gpu-marked or not: on CUDA the
# unmarked ones run the kernels too), with a log header naming the commit.
#
#   scripts/gpu_suite.sh LOG [pytest args...]
#   SUITE_PART=a|b|c scripts/gpu_suite.sh LOG [pytest args...]
#   SUITE_PART=a1|a2|a3 scripts/gpu_suite.sh LOG [pytest args without -k]
#
# The whole suite no longer fits one 600 s device call (at 8e3edd5, 16 workers, it
# reached 97% in 560 s). SUITE_PART splits it with no test in two parts and none left
# out: a = the Gluon file, c = the other long files (fuzz, determinism, distributed,
# holes), b = every other file. Run a, b and c, each logged. (At 5cc11bd the Gluon
# file and the other long files, then one part, took the whole 575 s of their call with
# 16 workers: every test ran, but pytest's summary was cut off.) On a fresh machine part a
# took 534 of its call's 600 s at 542a5db (Triton compiling); a1 (the paged ping-pong
# spans, a third of the file) and a2 (the rest of it) split it in two calls, and a3 (the
# forms with a padding partition, "fill" in their ids, taken out of a2) keeps a2 under
# the call's limit: a2 alone took 457 s at 2d02156.
#
# Runs in parallel processes on the one GPU (pytest-xdist, where installed): most of
# the time is Triton compiling kernel variants on the CPU, which parallelises.
# Exit status is pytest's.
set -u
cd "$(dirname "$0")/.."
log="${1:?usage: scripts/gpu_suite.sh LOG [pytest args...]}"
shift
export PYTHONPATH="${PYTHONPATH:-}:$PWD"
export PYTHONUNBUFFERED=1
# The device machine's git may be stale: the caller passes SUITE_COMMIT.
commit="${SUITE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
dirty="${SUITE_DIRTY:-}"
workers=()
# Several GPUs: each xdist worker takes one (tests/conftest.py reads SPANFILL_TEST_GPUS).
gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
[ "${gpus:-0}" -ge 1 ] 2>/dev/null || gpus=1
export SPANFILL_TEST_GPUS="${SPANFILL_TEST_GPUS:-$gpus}"
# One worker per CPU core by default: part a needs the device's 16 to fit one call (with
# 8 it reached 79% in 590 s at 4d37b3f).
python3 -c "import xdist" 2>/dev/null && workers=(-n "${SUITE_WORKERS:-$(nproc)}")
gluon_files=(tests/test_gluon_gpu.py)
long_files=(tests/test_fuzz.py tests/test_determinism.py tests/test_distributed.py
            tests/test_integrations_holes.py)
case "${SUITE_PART:-}" in
    "") ;;
    a) set -- "${gluon_files[@]}" "$@" ;;
    a1) set -- "${gluon_files[@]}" -k "test_pingpong_paged_spans" "$@" ;;
    a2) set -- "${gluon_files[@]}" -k "not test_pingpong_paged_spans and not fill" "$@" ;;
    a3) set -- "${gluon_files[@]}" -k "fill" "$@" ;;
    c) set -- "${long_files[@]}" "$@" ;;
    b) set -- tests "${gluon_files[@]/#/--ignore=}" "${long_files[@]/#/--ignore=}" "$@" ;;
    *) echo "SUITE_PART must be a, a1, a2, a3, b or c, got ${SUITE_PART}" >&2; exit 2 ;;
esac
# A hung kernel (a synchronisation bug in a new form) ends its own test's process after
# SUITE_TEST_TIMEOUT seconds, not the whole run; pytest-benchmark's xdist warnings are
# noise here (there are no timed tests in the suite).
python3 -c "import pytest_timeout" 2>/dev/null && \
    workers+=(--timeout "${SUITE_TEST_TIMEOUT:-300}" --timeout-method thread)
python3 -c "import pytest_benchmark" 2>/dev/null && workers+=(-p no:benchmark)
{
    echo "# whole test suite${SUITE_PART:+ (part ${SUITE_PART} of a, b, c)} at ${commit}${dirty:-}, $(date -u +%Y-%m-%dT%H:%MZ)"
    python3 -c "import torch, triton; print('#', torch.cuda.device_count(), 'x', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)"
    echo "# python3 -m pytest -q -rs ${workers[*]} $*"
} | tee "$log"
set -o pipefail
python3 -m pytest -q -rs -p no:cacheprovider "${workers[@]}" "$@" 2>&1 | tee -a "$log"
