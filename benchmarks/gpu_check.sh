#!/usr/bin/env bash
# One short GPU check (< 5 min on an H100/H200): Triton kernel correctness on CUDA, then the CUDA
# benchmark subset and the scaling/planner tables. Prints a compact table; full results in $OUT.
#
# The lent GPU machines have torch, triton and transformers but not diffusers, and no network:
# first, on a machine with PyPI, run   bash benchmarks/gpu_check.sh --prepare
# (downloads diffusers' wheel into .gpu_wheels/, which is git-ignored), then on the GPU machine,
# carrying .gpu_wheels:                 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
  python -m pip download --no-deps --dest .gpu_wheels "diffusers==0.42.1"
  exit 0
fi
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-index --find-links .gpu_wheels diffusers
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LAVA_BENCH_DEVICE=cuda
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== kernel correctness on CUDA (triton vs naive, torch vs naive) =="
timeout 150 "$PY" -m pytest -q -x tests/test_kernel_triton.py tests/test_kernels.py tests/test_propagate.py \
  -p no:cacheprovider \
  2>&1 | tail -3 | tee "$OUT/correctness.txt"

echo "== one captured layer: sdpa / naive / torch / triton =="
timeout 150 "$PY" -m pytest -q benchmarks/test_bench_slice.py benchmarks/test_bench_segment.py \
  --benchmark-only --benchmark-json "$OUT/bench.json" -p no:cacheprovider 2>&1 | tail -2

"$PY" - "$OUT/bench.json" <<'PY' | tee "$OUT/summary.txt"
import json, sys
runs = json.load(open(sys.argv[1]))["benchmarks"]
base = {}
for b in runs:
    e = b["extra_info"]
    if e.get("impl") == "sdpa":
        base[(e["n_img"], e["heads"])] = b["stats"]["median"]
print(f"{'test':44s} {'median ms':>10s} {'/ sdpa':>7s} {'TFLOP/s':>8s} {'peak MiB':>9s}")
for b in runs:
    e = b["extra_info"]
    ref = base.get((e.get("n_img"), e.get("heads")))
    ratio = f"{b['stats']['median'] / ref:.2f}" if ref and e.get("impl") != "sdpa" else "-"
    tf = f"{e['tflops']:.0f}" if "tflops" in e else "-"
    print(f"{b['name'][:44]:44s} {b['stats']['median'] * 1e3:10.2f} {ratio:>7s} {tf:>8s} "
          f"{e.get('peak_extra_bytes', 0) / 2**20:9.1f}")
PY

echo "== scaling and planner tables (written to docs/benchmarks.md) =="
timeout 90 "$PY" benchmarks/scaling.py --device cuda --sizes 1024,4096,16384 2>&1 | tail -1
timeout 60 "$PY" benchmarks/planner_check.py --device cuda --sizes 512,1024,2048 2>&1 | tail -1
cp docs/benchmarks.md docs/figures/scaling-cuda.png "$OUT/" 2>/dev/null || true
