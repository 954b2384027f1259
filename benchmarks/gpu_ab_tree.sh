#!/usr/bin/env bash
# One device call: the kernels of a git ref (A, default HEAD) against the working tree (B): both built in parallel,
# the GPU tests on B, then the kernel bench A, B, A, B (so drift between runs shows as A1 against A2) and the
# comparisons A1-B1, A2-B2, A1-A2 (benchmarks/compare_kernels.py). Bench arguments pass through.
# Usage (repo root, on the GPU machine; carry .deps for CUTLASS's headers):
#   REF=HEAD bash benchmarks/gpu_ab_tree.sh --m 1 4 8 16 --densities 0 0.01
# SKIP_TESTS=1: no tests. Writes $OUT/kernels-{A1,B1,A2,B2}.json, compare-*.txt, test_cuda-B.log, bench-*.log.
set -o pipefail
export PYTHONUNBUFFERED=1 LIBORTHO_BENCH_VARIANTS=${LIBORTHO_BENCH_VARIANTS:-v1}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$(date +%s)
for whl in .deps/nvidia_cutlass-*.whl; do [ -f "$whl" ] && python3 -m pip install -q --no-deps "$whl" 2>&1 | tail -1; done
A=/tmp/ab_tree_a; rm -rf $A && mkdir -p $A && git archive "${REF:-HEAD}" src | tar -x -C $A
BUILD="from libortho.ops import cuda; ok = cuda.build(verbose=False); print('build ok' if ok else str(cuda._state['error'])[-2000:])"
(cd $A && PYTHONPATH=$A/src LIBORTHO_BUILD_DIR=$A/.te python3 -c "$BUILD" 2>&1 | tail -3 | sed 's/^/A: /') &
(PYTHONPATH=$PWD/src LIBORTHO_BUILD_DIR=$PWD/.te python3 -c "$BUILD" 2>&1 | tail -3 | sed 's/^/B: /') &
wait
echo "builds: $(( $(date +%s) - t0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  PYTHONPATH=$PWD/src LIBORTHO_BUILD_DIR=$PWD/.te python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py \
    > "$OUT/test_cuda-B.log" 2>&1
  echo "tests B: $(tail -1 "$OUT/test_cuda-B.log") $(( $(date +%s) - t0 )) s"; grep -E "^FAILED" "$OUT/test_cuda-B.log" | head -5
fi
for run in A1 B1 A2 B2; do
  if [ "${run:0:1}" = A ]; then dir=$A; else dir=$PWD; fi
  (cd $dir && PYTHONPATH=$dir/src LIBORTHO_BUILD_DIR=$dir/.te python3 -m libortho.eval.bench_kernels \
     --out "$OUT/kernels-$run.json" "$@" > "$OUT/bench-$run.log" 2>&1)
  echo "bench $run: rc $?, $(( $(date +%s) - t0 )) s"
done
for p in "A1 B1" "A2 B2" "A1 A2"; do set -- $p
  python3 benchmarks/compare_kernels.py "$OUT/kernels-$1.json" "$OUT/kernels-$2.json" > "$OUT/compare-$1-$2.txt" 2>&1
  echo "== $1 vs $2"; grep -i "median" "$OUT/compare-$1-$2.txt" | head -4
done
