#!/usr/bin/env bash
# One device call: build, the GPU tests, then the kernel bench with $VAR=$A and with $VAR=$B, and their comparison
# (benchmarks/compare_kernels.py). Three kinds of switch:
#   a switch read when the extension loads, e.g. LIBORTHO_V1_LEAN (one build):
#     VAR=LIBORTHO_V1_LEAN A=off B=on bash benchmarks/gpu_ab.sh --m 1 2 4 8 16 --densities 0 0.01 0.05
#   VAR=LIBORTHO_NVCC_FLAGS: two builds (build-time switches, e.g. A="" B="-DLIBORTHO_ORTHO_L2PF=1");
#   VAR=REF: the kernels of git ref $A (e.g. HEAD~1) against the working tree (B unused), e.g. a draft against main.
# Two builds get their own build folders ($LIBORTHO_BUILD_DIR-A / -B, built in parallel); with REF the ref's sources go
# to /tmp/ab_ref. GPU tests unless SKIP_TESTS=1: one file for one build, per side for NVCC flags, the tree's for REF.
# ROUNDS=2 runs the bench A, B, A, B (drift between runs shows as A1 against A2). Carry .deps for CUTLASS's headers.
# Writes $OUT/kernels-A.json, kernels-B.json (ROUNDS > 1: kernels-A1.json, ...), compare*.txt, test_cuda*.log, bench-*.log.
set -o pipefail
: "${VAR:?set VAR to the switch}" "${A?set A}"
[ "$VAR" = REF ] || : "${B?set B}"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-} LIBORTHO_BUILD_DIR=${LIBORTHO_BUILD_DIR:-$PWD/.torch_extensions}
export LIBORTHO_BENCH_VARIANTS=${LIBORTHO_BENCH_VARIANTS:-v1}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
# CUTLASS's headers (M 65-512 alpha 0 path) from a wheel carried in .deps, as the recorded tables were built; the
# machine has no network (pip install --no-deps nvidia-cutlass==4.2.0.0 elsewhere)
for whl in .deps/nvidia_cutlass-*.whl; do [ -f "$whl" ] && python3 -m pip install -q --no-deps "$whl" 2>&1 | tail -1; done
python3 -c "from libortho.ops import cuda; print('CUTLASS headers:', cuda.cutlass_include())"
# not `libortho build-kernels`: with REF the ref's sources may predate that command
BUILD="from libortho.ops import cuda; ok = cuda.build(verbose=False); print('build ok' if ok else cuda._state['error'])"
base=$LIBORTHO_BUILD_DIR ROOT=$PWD REF_DIR=/tmp/ab_ref
two_builds() { [ "$VAR" = LIBORTHO_NVCC_FLAGS ] || [ "$VAR" = REF ]; }
side_dir() { if [ "$VAR" = REF ] && [ "$1" = A ]; then echo "$REF_DIR"; else echo "$ROOT"; fi; }
# ENV: a side's environment (its sources first, its build folder and, unless REF, its value of the switch)
side_env() {
  ENV=("PYTHONPATH=$(side_dir "$1")/src:$PYTHONPATH")
  if two_builds; then ENV+=("LIBORTHO_BUILD_DIR=$base-$1"); else ENV+=("LIBORTHO_BUILD_DIR=$base"); fi
  [ "$VAR" = REF ] || ENV+=("$VAR=${!1}")
}
if [ "$VAR" = REF ]; then rm -rf "$REF_DIR" && mkdir -p "$REF_DIR" && git archive "$A" src | tar -x -C "$REF_DIR"; fi
if two_builds; then
  for side in A B; do (side_env $side; env "${ENV[@]}" python3 -c "$BUILD" 2>&1 | tail -5 | sed "s/^/$side: /") & done; wait
else
  python3 -c "$BUILD" 2>&1 | tail -5
fi
echo "build: $(( $(date +%s) - t0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  case "$VAR" in
    LIBORTHO_NVCC_FLAGS) tested="A B" ;;
    REF) tested=B ;;
    *) tested="" ;;
  esac
  if [ -n "$tested" ]; then
    for side in $tested; do
      side_env $side
      env "${ENV[@]}" python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py \
        > "$OUT/test_cuda-$side.log" 2>&1
      echo "tests $side: $(tail -1 "$OUT/test_cuda-$side.log")"; grep -E "^FAILED" "$OUT/test_cuda-$side.log" | head -3
    done
  else
    python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -5
  fi
fi
rounds=${ROUNDS:-1}
for r in $(seq "$rounds"); do
  for side in A B; do
    tag=$side; [ "$rounds" -gt 1 ] && tag=$side$r
    side_env $side
    (cd "$(side_dir $side)" && env "${ENV[@]}" python3 -m libortho.eval.bench_kernels --out "$OUT/kernels-$tag.json" \
       "$@" > "$OUT/bench-$tag.log" 2>&1)
    echo "bench $tag: rc $?, $(( $(date +%s) - t0 )) s"
  done
done
compare() {
  python3 benchmarks/compare_kernels.py "$OUT/kernels-$1.json" "$OUT/kernels-$2.json" | tee "$OUT/compare$3.txt" | tail -12
}
if [ "$rounds" -gt 1 ]; then
  for r in $(seq "$rounds"); do echo "== A$r vs B$r"; compare "A$r" "B$r" "-A$r-B$r"; done
  echo "== A1 vs A2 (drift)"; compare A1 A2 -A1-A2
  echo "== every round (B_i / A_i per row, their mean, each side's own spread)"
  files() { local f=""; for r in $(seq "$rounds"); do f="$f${f:+,}$OUT/kernels-$1$r.json"; done; echo "$f"; }
  python3 benchmarks/compare_kernels.py "$(files A)" "$(files B)" | tee "$OUT/compare-rounds.txt" | tail -4
else
  compare A B ""
fi
