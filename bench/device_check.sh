#!/usr/bin/env bash
# On a machine with CUDA: the GPU-marked tests (NCCL groups of world size 1, the CUDA adapters,
# peak memory reports), then one small render per strategy as a table. Under 5 minutes; not CI.
# Without CUDA the tests skip, saying so, and the table is the CPU's (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
timeout 200 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
timeout 90 "$PY" -m bench.device_check "$@"
