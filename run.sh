#!/usr/bin/env bash
# fasttrain's two commands, with all the set-up they need on a fresh machine:
#   ./run.sh speedrun [flags]   train tokenizer -> base -> mid -> sft on the embedded default, then report
#   ./run.sh test [pytest args] run the test suite (and check that the CUDA sources compile)
# Both create or reuse the virtual environment .venv (FASTTRAIN_VENV overrides the path).
set -euo pipefail
cd "$(dirname "$0")"
venv=${FASTTRAIN_VENV:-.venv}

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

if ! python -c "import torch, triton, numpy, numba, tiktoken, regex, pytest" 2>/dev/null; then
    python -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        python -m pip install -q "torch>=2.11,<2.15"
    else
        python -m pip install -q torch==2.13.0  # the CPU build
    fi
    python -m pip install -q "triton>=3.6,<3.10" numpy numba tiktoken regex pytest pyarrow
fi
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
        ;;
    *)
        echo "usage: ./run.sh speedrun [flags] | ./run.sh test [pytest args]" >&2
        exit 2
        ;;
esac
