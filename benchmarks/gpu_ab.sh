#!/usr/bin/env bash
# One device call: build, the GPU tests, then the kernel bench twice, with $VAR=$A and with $VAR=$B (a switch read
# when the extension loads, e.g. LIBORTHO_V1_LEAN), and their comparison (benchmarks/compare_kernels.py).
# Usage (repo root, on the GPU machine):
#   VAR=LIBORTHO_V1_LEAN A=off B=on bash benchmarks/gpu_ab.sh --m 1 2 4 8 16 --densities 0 0.01 0.05
# SKIP_TESTS=1: no tests. Writes $OUT/kernels-A.json, kernels-B.json, compare.txt, test_cuda.log, bench-*.log.
set -o pipefail
: "${VAR:?set VAR to the switch}" "${A:?set A}" "${B:?set B}"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-} LIBORTHO_BUILD_DIR=${LIBORTHO_BUILD_DIR:-$PWD/.torch_extensions}
export LIBORTHO_BENCH_VARIANTS=${LIBORTHO_BENCH_VARIANTS:-v1}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -c "from libortho.ops import cuda; ok = cuda.build(verbose=False); print('build ok' if ok else cuda._state['error'])" 2>&1 | tail -5
echo "build: $(( $(date +%s) - t0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -5
fi
for side in A B; do
  env "$VAR=${!side}" python3 -m libortho.eval.bench_kernels --out "$OUT/kernels-$side.json" "$@" > "$OUT/bench-$side.log" 2>&1
  echo "bench $side ($VAR=${!side}): rc $?, $(( $(date +%s) - t0 )) s"
done
python3 benchmarks/compare_kernels.py "$OUT/kernels-A.json" "$OUT/kernels-B.json" | tee "$OUT/compare.txt" | tail -12
