#!/usr/bin/env bash
# The one command for a GPU machine: the `gpu`-marked tests, then the GPU benchmarks.
# Run from the repository root; results go to stdout (each benchmark ends with one JSON line).
# On the lent machine the packages are preinstalled, so the tree runs in place (PYTHONPATH=.).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0   # compiled kernels (tests/conftest.py defaults to the interpreter for CPU runs)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
status=0
python -m pytest -q -m gpu -p no:cacheprovider || status=1
python scripts/bench_resident.py --device cuda || status=1
for extra in scripts/bench_weights.py scripts/bench_kv.py scripts/bench_kernels.py scripts/trace_sweep.py; do
  [ -f "$extra" ] && { python "$extra" --device cuda || status=1; }
done
exit $status
