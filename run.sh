#!/usr/bin/env bash
# fasttrain's two commands, with all the set-up they need on a fresh machine:
#   ./run.sh speedrun [flags]   train tokenizer -> base -> mid -> sft on the embedded default, then report
#   ./run.sh test [pytest args] run the test suite on the newest supported Triton, then the kernel
#                               tests (interpreter and GPU compile tier) on the oldest, Triton 3.6
#   ./run.sh test --triton 3.6 [pytest args]   only the kernel tests, only on Triton 3.6
# They create or reuse the virtual environment .venv (FASTTRAIN_VENV overrides the path); the
# Triton 3.6 tests use a second one, .venv-triton3.6, which imports fasttrain from this folder.
set -euo pipefail
cd "$(dirname "$0")"
venv=${FASTTRAIN_VENV:-.venv}
oldest_venv=.venv-triton3.6
kernel_tests=(tests/test_attention.py tests/test_autotune.py tests/test_rope.py tests/test_cross_entropy.py
              tests/test_gpu_compile.py)

# make_venv PATH TRITON NUMPY: create PATH if needed and install what the project needs into it
make_venv() {
    [ -x "$1/bin/python" ] || python3 -m venv "$1"
    if ! "$1/bin/python" -c "import torch, triton, numpy, numba, tiktoken, regex, pytest" 2>/dev/null; then
        "$1/bin/python" -m pip install -q --upgrade pip
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
            "$1/bin/python" -m pip install -q "torch>=2.11,<2.15"
        else
            "$1/bin/python" -m pip install -q torch==2.13.0  # the CPU build
        fi
        "$1/bin/python" -m pip install -q "$2" "$3" numba tiktoken regex pytest pyarrow
    fi
}

# Triton 3.6's interpreter reads 1-element arrays as Python ints: numpy 2.4 fails on that, and
# numpy >= 1.25 warns on each (thousands of times a run; the warning is filtered).
oldest_tests() {
    make_venv "$oldest_venv" "triton==3.6.0" "numpy<2.4"
    PYTHONPATH=$PWD "$oldest_venv/bin/python" -m pytest -q \
        -W "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning" \
        "${kernel_tests[@]}" "$@"
}

if [ "${1:-}" = test ] && [ "${2:-}" = --triton ]; then
    if [ "${3:-}" != 3.6 ]; then
        echo "usage: ./run.sh test --triton 3.6 [pytest args] (the default run uses the newest)" >&2
        exit 2
    fi
    shift 3
    oldest_tests "$@"
    exit
fi

make_venv "$venv" "triton>=3.6,<3.10" numpy
# shellcheck disable=SC1091
. "$venv/bin/activate"
# (re)build the packing extension when it is missing or older than its sources
so=$(ls fasttrain/_packing*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" 2>/dev/null | head -n 1)" ]; then
    python -m pip install -q --no-build-isolation --no-deps -e .
fi

command=${1:-}
shift || true
case "$command" in
    speedrun)
        python -m fasttrain speedrun "$@"
        ;;
    test)
        bash csrc/check_cuda_compiles.sh
        python -m pytest -q "$@"
        oldest_tests "$@"
        ;;
    *)
        echo "usage: ./run.sh speedrun [flags] | ./run.sh test [--triton 3.6] [pytest args]" >&2
        exit 2
        ;;
esac
