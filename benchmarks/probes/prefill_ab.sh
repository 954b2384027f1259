#!/usr/bin/env bash
# Alpha 1's 2048-token prefill on the 7B shape, an older tree (A) against this one (B) on one machine, A B A B, and the
# op alone at M = 2048 on the 7B shapes under both builds. Session 55 (H200: benchmarks/NOTES-decode.md,
# results/prefill-ab-H200-s55-*). A's tree comes with the working tree (the device has no git history); here, first:
#   rm -rf .snap/ab_ref && mkdir -p .snap/ab_ref && git archive REF src | tar -x -C .snap/ab_ref
# then on the GPU machine (one call, carry [".deps"], ~350 s): bash benchmarks/probes/prefill_ab.sh
# OUT gets prefill_ab.tgz (logs, JSON of each run).
set -o pipefail
export PYTHONUNBUFFERED=1
REF=${REF:-.snap/ab_ref/src}
[ -d "$REF/libortho" ] || { echo "no reference tree at $REF (see the header)"; exit 1; }
FINAL=${OUT:-/tmp/out}; OUT=/tmp/prefill_ab; rm -rf "$OUT"; mkdir -p "$OUT" "$FINAL"
trap 'tar czf "$FINAL/prefill_ab.tgz" -C /tmp prefill_ab' EXIT
for whl in .deps/nvidia_cutlass-*.whl; do [ -f "$whl" ] && python3 -m pip install -q --no-deps "$whl" 2>&1 | tail -1; done
rm -rf /tmp/ab_ref && mkdir -p /tmp/ab_ref && cp -r "$REF" /tmp/ab_ref/src
find src /tmp/ab_ref/src -type f -exec touch -d 2000-01-01 {} +  # one timestamp: the build caches key on sources
src_of() { [ "$1" = A ] && echo /tmp/ab_ref/src || echo "$PWD/src"; }
BUILD="from libortho.ops import cuda; ok = cuda.build(verbose=False); print('build ok' if ok else cuda._state['error'])"
t0=$(date +%s)
for side in A B; do
  (PYTHONPATH=$(src_of $side) LIBORTHO_BUILD_DIR=/tmp/ext-$side python3 -c "$BUILD" 2>&1 | tail -3 | sed "s/^/$side: /") &
done; wait
echo "builds: $(( $(date +%s) - t0 )) s"
for side in A B; do  # the op alone: the 7B layers as the decoder runs them (q/k/v fused, o, gate/up fused, down)
  PYTHONPATH=$(src_of $side) LIBORTHO_BUILD_DIR=/tmp/ext-$side timeout 100 python3 -m libortho.eval.bench_kernels \
    --shapes 12288x4096 4096x4096 22016x4096 4096x11008 --m 2048 --densities 0 0.01 --replays 7 \
    --out "$OUT/k2048-$side.json" > "$OUT/k2048-$side.log" 2>&1
  echo "kernels $side rc $?"; grep -v "^ *$" "$OUT/k2048-$side.log" | tail -6
done
ARGS="--models llama2-7b-shape --mode graph --prefill-len 2048 --batches 1 --new-tokens 8 --reps 5 --variants alpha1 alpha0 --no-progress"
for round in 1 2; do
  [ $round = 2 ] && [ $(( $(date +%s) - t0 )) -gt 330 ] && { echo "no time for round 2"; break; }
  for side in A B; do
    PYTHONPATH=$(src_of $side) LIBORTHO_BUILD_DIR=/tmp/ext-$side timeout 110 python3 -m libortho.eval.bench_decode $ARGS \
      --out "$OUT/prefill-$side$round.json" > "$OUT/prefill-$side$round.log" 2>&1
    echo "$side$round rc $?: $(grep -E 'prefill 2048' "$OUT/prefill-$side$round.log" | tr '\n' ' ')"
  done
done
echo "total $(( $(date +%s) - t0 )) s"
