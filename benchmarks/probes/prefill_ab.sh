#!/usr/bin/env bash
# Alpha 1's 2048-token prefill on the 7B shape: the tree of git ref $A against the working tree on one machine. First
# benchmarks/gpu_ab.sh's REF mode builds both and times the op alone at M = 2048 on the layers the 7B decoder runs
# (q/k/v fused, o, gate/up fused, down); then the prefill A B A B on those builds. Session 55, A=dc37518 (H200;
# benchmarks/NOTES-decode.md; results/prefill-ab-H200-s55-*, kernels-H200-m2048-s55-*). One call, carry [".deps"]:
#   A=dc37518 bash benchmarks/probes/prefill_ab.sh
# $OUT gets prefill_ab.tgz (every log and JSON: a call brings back only a few files).
set -o pipefail
: "${A:?set A to the git ref to compare against}"
FINAL=${OUT:-/tmp/out}; mkdir -p "$FINAL"
export OUT=/tmp/prefill_ab LIBORTHO_BUILD_DIR=${LIBORTHO_BUILD_DIR:-$PWD/.torch_extensions}
rm -rf "$OUT"; mkdir -p "$OUT"
trap 'tar czf "$FINAL/prefill_ab.tgz" -C /tmp prefill_ab' EXIT
t0=$(date +%s)
VAR=REF SKIP_TESTS=1 bash benchmarks/gpu_ab.sh --shapes 12288x4096 4096x4096 22016x4096 4096x11008 --m 2048 \
  --densities 0 0.01 --replays 7 || exit
ARGS="--models llama2-7b-shape --mode graph --prefill-len 2048 --batches 1 --new-tokens 8 --reps 5 --variants alpha1 alpha0 --no-progress"
for round in 1 2; do
  [ $round = 2 ] && [ $(( $(date +%s) - t0 )) -gt 330 ] && { echo "no time for round 2"; break; }
  for side in A B; do  # gpu_ab.sh's sources (/tmp/ab_ref for the ref) and build folders
    src=$([ $side = A ] && echo /tmp/ab_ref/src || echo "$PWD/src")
    PYTHONPATH=$src LIBORTHO_BUILD_DIR=$LIBORTHO_BUILD_DIR-$side timeout 110 python3 -m libortho.eval.bench_decode \
      $ARGS --out "$OUT/prefill-$side$round.json" > "$OUT/prefill-$side$round.log" 2>&1
    echo "$side$round rc $?: $(grep -E 'prefill 2048' "$OUT/prefill-$side$round.log" | tr '\n' ' ')"
  done
done
echo "total $(( $(date +%s) - t0 )) s"
