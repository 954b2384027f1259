#!/usr/bin/env bash
# One device call for v1 configuration work: build, the v1 configuration GPU tests, then the tuning probe
# (benchmarks/probes/v1_configs.py) on the kernel shapes and on the decode's fused shapes.
# Usage (repo root, on the GPU machine):
#   CONFIGS="8 11 16 20 23" bash benchmarks/gpu_probe.sh            # M 1 4 8 16 (default), both shape sets
#   CONFIGS="11 23" M="1 8" FUSED_ONLY=1 bash benchmarks/gpu_probe.sh
# SKIP_TESTS=1: no tests. Writes $OUT/probe.json, probe-fused.json, probe.log, test_v1.log.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-} LIBORTHO_BUILD_DIR=${LIBORTHO_BUILD_DIR:-$PWD/.torch_extensions}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m libortho.cli build-kernels 2>&1 | tail -5
echo "build: $(( $(date +%s) - t0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py \
    -k "every_v1_configuration or other_warp_counts or lean_ring or v1_table" > "$OUT/test_v1.log" 2>&1
  tail -3 "$OUT/test_v1.log"; echo "tests: $(( $(date +%s) - t0 )) s"
fi
cfgs=(${CONFIGS:+--configs $CONFIGS}); ms=(--m ${M:-1 4 8 16})
if [ "${FUSED_ONLY:-0}" != 1 ]; then
  python3 benchmarks/probes/v1_configs.py "${cfgs[@]}" "${ms[@]}" --out "$OUT/probe.json" 2>&1 | tee "$OUT/probe.log" | tail -1
fi
python3 benchmarks/probes/v1_configs.py "${cfgs[@]}" "${ms[@]}" --shapes 12288x4096 22016x4096 \
  --out "$OUT/probe-fused.json" 2>&1 | tee -a "$OUT/probe.log" | tail -1
echo "all: $(( $(date +%s) - t0 )) s"
