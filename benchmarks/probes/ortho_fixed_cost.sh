#!/usr/bin/env bash
# Where alpha 1's fixed part (M = 1, 0.01 % ortho) sits. Timing probes (results wrong, not tested):
# (Session 47, H200: benchmarks/NOTES-decode.md; results/kernels-H200-s47-probe-*.json.) OUT: where the JSON goes.
#   P0 main; P1 without the runs after the sweep (staging kept); P2 also without the staging (row pointers kept).
export PYTHONUNBUFFERED=1 LIBORTHO_BENCH_VARIANTS=v1 OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for whl in .deps/nvidia_cutlass-*.whl; do [ -f "$whl" ] && python3 -m pip install -q --no-deps "$whl" 2>&1 | tail -1; done
t0=$(date +%s)
for p in P0 P1 P2; do rm -rf /tmp/$p && mkdir -p /tmp/$p && cp -r src /tmp/$p/; done
V=src/libortho/ops/csrc/v1.cuh
sed -i 's/  if (ortho \&\& !base_adds) {/  if (false \&\& ortho \&\& !base_adds) {/' /tmp/P1/$V /tmp/P2/$V
sed -i 's/  bool staged = !ortho;/  bool staged = true;/' /tmp/P2/$V
for p in P1 P2; do  # the edits must have matched (P1 one line, P2 two), else the probe would time main twice
  n=$(diff /tmp/P0/$V /tmp/$p/$V | grep -c '^>'); echo "$p: $n lines changed"
  [ "$n" = "${p#P}" ] || { echo "$p: v1.cuh no longer has the lines this probe edits"; exit 1; }
done
for p in P0 P1 P2; do
  (PYTHONPATH=/tmp/$p/src LIBORTHO_BUILD_DIR=/tmp/build-$p python3 -c \
    "from libortho.ops import cuda; ok = cuda.build(verbose=False); print('$p build ok' if ok else cuda._state['error'])" 2>&1 | tail -2) &
done; wait
echo "builds $(( $(date +%s) - t0 )) s"
for r in 1 2; do for p in P0 P1 P2; do
  (cd /tmp/$p && PYTHONPATH=/tmp/$p/src LIBORTHO_BUILD_DIR=/tmp/build-$p python3 -m libortho.eval.bench_kernels \
     --shapes 4096x4096 11008x4096 4096x11008 14336x4096 1024x4096 --m 1 --densities 0 0.0001 0.01 \
     --out $OUT/probe-$p-$r.json > /tmp/bench-$p-$r.log 2>&1); echo "bench $p $r rc $? $(( $(date +%s) - t0 )) s"
done; done
python3 - <<'PY'
import json, os
O = os.environ["OUT"]
rows = {(p, r): json.load(open(f"{O}/probe-{p}-{r}.json"))["rows"] for p in ("P0", "P1", "P2") for r in (1, 2)}
for i, a in enumerate(rows[("P0", 1)]):
    cells = []
    for p in ("P0", "P1", "P2"):
        a0 = min(rows[(p, r)][i]["alpha0_us"] for r in (1, 2)); a1 = min(rows[(p, r)][i]["alpha1_us"] for r in (1, 2))
        cells.append(f"{p} a0 {a0:6.2f} a1 {a1:6.2f} (+{a1 - a0:4.2f})")
    print(f"{a['N']:>6}x{a['K']:<6} d={a['density']:<7} " + "  ".join(cells))
PY
