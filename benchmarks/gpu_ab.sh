#!/usr/bin/env bash
# One device call: build, the GPU tests, then the kernel bench twice, with $VAR=$A and with $VAR=$B (a switch read
# when the extension loads, e.g. LIBORTHO_V1_LEAN), and their comparison (benchmarks/compare_kernels.py).
# Usage (repo root, on the GPU machine):
#   VAR=LIBORTHO_V1_LEAN A=off B=on bash benchmarks/gpu_ab.sh --m 1 2 4 8 16 --densities 0 0.01 0.05
# VAR=LIBORTHO_NVCC_FLAGS compares two builds (build-time switches, e.g. A="" B="-DLIBORTHO_ORTHO_L2PF=1"): each
# side gets its own build folder ($LIBORTHO_BUILD_DIR-A / -B, built in parallel) and, unless SKIP_TESTS=1, its own
# GPU tests (test_cuda-A.log / -B.log).
# SKIP_TESTS=1: no tests. Writes $OUT/kernels-A.json, kernels-B.json, compare.txt, test_cuda*.log, bench-*.log.
set -o pipefail
: "${VAR:?set VAR to the switch}" "${A?set A}" "${B?set B}"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-} LIBORTHO_BUILD_DIR=${LIBORTHO_BUILD_DIR:-$PWD/.torch_extensions}
export LIBORTHO_BENCH_VARIANTS=${LIBORTHO_BENCH_VARIANTS:-v1}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
# CUTLASS's headers (M 65-512 alpha 0 path) from a wheel carried in .deps, as the recorded tables were built; the
# machine has no network (pip install --no-deps nvidia-cutlass==4.2.0.0 elsewhere)
for whl in .deps/nvidia_cutlass-*.whl; do [ -f "$whl" ] && python3 -m pip install -q --no-deps "$whl" 2>&1 | tail -1; done
python3 -c "from libortho.ops import cuda; print('CUTLASS headers:', cuda.cutlass_include())"
BUILD="from libortho.ops import cuda; ok = cuda.build(verbose=False); print('build ok' if ok else cuda._state['error'])"
if [ "$VAR" = LIBORTHO_NVCC_FLAGS ]; then
  base=$LIBORTHO_BUILD_DIR
  side_env() { echo "LIBORTHO_BUILD_DIR=$base-$1"; }
  for side in A B; do (env "$(side_env $side)" "$VAR=${!side}" python3 -c "$BUILD" 2>&1 | tail -5) & done; wait
else
  side_env() { echo "LIBORTHO_BUILD_DIR=$LIBORTHO_BUILD_DIR"; }
  python3 -c "$BUILD" 2>&1 | tail -5
fi
echo "build: $(( $(date +%s) - t0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  if [ "$VAR" = LIBORTHO_NVCC_FLAGS ]; then
    for side in A B; do
      env "$(side_env $side)" "$VAR=${!side}" python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py \
        > "$OUT/test_cuda-$side.log" 2>&1
      echo "tests $side: $(tail -1 "$OUT/test_cuda-$side.log")"; grep -E "^FAILED" "$OUT/test_cuda-$side.log" | head -3
    done
  else
    python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -5
  fi
fi
for side in A B; do
  env "$(side_env $side)" "$VAR=${!side}" python3 -m libortho.eval.bench_kernels --out "$OUT/kernels-$side.json" "$@" \
    > "$OUT/bench-$side.log" 2>&1
  echo "bench $side ($VAR=${!side}): rc $?, $(( $(date +%s) - t0 )) s"
done
python3 benchmarks/compare_kernels.py "$OUT/kernels-A.json" "$OUT/kernels-B.json" | tee "$OUT/compare.txt" | tail -12
