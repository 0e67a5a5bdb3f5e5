#!/usr/bin/env bash
# The one command for a GPU machine: the `gpu`-marked tests, the GPU benchmarks, then the TKLQT
# sweep on compiled kernels (`tierkv trace run` on the demo model, batch sizes 1..32), and the same
# at batch 1, 8, 32 with the layers compiled (--compile) and replayed from CUDA graphs (--cuda-graph).
#
#   scripts/gpu_check.sh [OUT_DIR]        (default: out/gpu-check)
#
# Each step prints to stdout and to OUT_DIR/<step>.log (each benchmark ends with one JSON line);
# the sweep writes OUT_DIR/trace/ (report.json, tklqt.png, one chrome trace per batch size);
# OUT_DIR/summary.txt has one line per step: ok or FAILED, and its seconds.
# It is sized to about 9.5 minutes on an H100: each step has a share of that time and is stopped,
# failing the check, when it runs past it (GPU_CHECK_TIME_SCALE=2 doubles every share).
# Exit status: 0 when every step passed; 1 when a step failed or this is no CUDA machine; 2 when a
# file it needs is missing (checked first, so nothing runs).
# On the lent machine the packages are preinstalled, so the tree runs in place (PYTHONPATH=.).
set -uo pipefail
cd "$(dirname "$0")/.."

needs=(scripts/bench_resident.py scripts/bench_weights.py scripts/bench_kv.py scripts/bench_kernels.py
       scripts/bench_quant_kernels.py tierkv/__main__.py tierkv/demo_model/config.json tierkv/demo_model/model.safetensors)
missing=0
for path in "${needs[@]}"; do
  [ -f "$path" ] || { echo "gpu_check.sh: missing $path, which this check needs" >&2; missing=1; }
done
[ "$missing" = 0 ] ||
  { echo "gpu_check.sh: nothing was run: restore the missing files, or take them out of scripts/gpu_check.sh" >&2; exit 2; }

out="${1:-out/gpu-check}"
scale="${GPU_CHECK_TIME_SCALE:-1}"
[[ "$scale" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: GPU_CHECK_TIME_SCALE must be a whole number >= 1, not '$scale'" >&2; exit 2; }
mkdir -p "$out" || exit 1
: > "$out/summary.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0   # compiled kernels (tests/conftest.py defaults to the interpreter for CPU runs)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ||
  { echo "gpu_check.sh: nvidia-smi failed: run this on a machine with an NVIDIA GPU" >&2; exit 1; }
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  { echo "gpu_check.sh: torch sees no CUDA device (a CPU-only torch build?): install a CUDA build of torch" >&2; exit 1; }

status=0
step() {  # step NAME SECONDS COMMAND...: run COMMAND within SECONDS x scale, log it, record the outcome
  local name=$1 cap=$(($2 * scale)) t0=$SECONDS rc line
  shift 2
  echo "== $name (at most $cap s): $*"
  timeout --kill-after=15 "$cap" "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    line="ok      $name  $((SECONDS - t0)) s"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    line="FAILED  $name  ran past its $cap s share of the check and was stopped (GPU_CHECK_TIME_SCALE=2 doubles every share)"
    status=1
  else
    line="FAILED  $name  exit status $rc after $((SECONDS - t0)) s: see $out/$name.log"
    status=1
  fi
  echo "$line" | tee -a "$out/summary.txt"
}

peer=()
python -c "import accelerate" 2>/dev/null ||
  { peer=(--skip-peer); echo "gpu_check.sh: accelerate is not installed: bench_weights.py runs without its peer" |
      tee -a "$out/summary.txt"; }

# shares in seconds: 120 + 60 + 100 + 60 + 45 + 40 + 45 + 35 + 35 = 540, plus start-up, about 9.5 minutes
step gpu-tests      120 python -m pytest -q -m gpu -p no:cacheprovider -rs
step bench_resident  60 python scripts/bench_resident.py --device cuda
step bench_weights  100 python scripts/bench_weights.py --device cuda ${peer[@]+"${peer[@]}"}
step bench_kv        60 python scripts/bench_kv.py --device cuda
step bench_kernels   45 python scripts/bench_kernels.py --device cuda
step bench_quant_kernels 40 python scripts/bench_quant_kernels.py --device cuda
step trace-sweep     45 python -m tierkv trace run demo --device cuda --batch-sizes 1,2,4,8,16,32 --out "$out/trace"
# the same decode step compiled (torch.compile of the layer halves), then replayed from CUDA graphs:
# TKLQT and tok/s at batch 1, 8, 32 beside the eager sweep above
step trace-compiled  35 python -m tierkv trace run demo --device cuda --batch-sizes 1,8,32 --compile --out "$out/trace-compiled"
step trace-graphs    35 python -m tierkv trace run demo --device cuda --batch-sizes 1,8,32 --cuda-graph --out "$out/trace-graphs"
echo "== summary ($out/summary.txt)"
cat "$out/summary.txt"
exit $status
