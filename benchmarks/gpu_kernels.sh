#!/usr/bin/env bash
# One device call: build the CUDA extension, run the GPU tests, run the kernel benchmark.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_kernels.sh [bench args...]
# The GPU tests run every small-M kernel variant (v1, v2, v3) and the bench times each for M <= 16
# (LIBORTHO_BENCH_VARIANTS=v1,v3 keeps a subset; a variant that fails its tests is dropped);
# LIBORTHO_DECODE_KERNEL=v1|v2|v3 picks the one behind the unsuffixed bench columns. SKIP_BENCH=1: no bench.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-} LIBORTHO_BUILD_DIR=${LIBORTHO_BUILD_DIR:-$PWD/.torch_extensions}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/card.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/card.txt"
t0=$(date +%s)
# CUTLASS's headers (M 65-512 alpha 0 path) from a wheel carried in .deps, as the recorded tables were built; the
# machine has no network (pip install --no-deps nvidia-cutlass==4.2.0.0 elsewhere)
for whl in .deps/nvidia_cutlass-*.whl; do [ -f "$whl" ] && python3 -m pip install -q --no-deps "$whl" 2>&1 | tail -1; done
python3 -m libortho.cli build-kernels 2>&1 | tail -30
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "from libortho.ops import cuda; print('decode kernel (default columns):', cuda.decode_kernel())"
python3 benchmarks/check_errors.py 2>&1 | tail -5
python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -40
python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda_attention.py 2>&1 | tee "$OUT/test_cuda_attention.log" | tail -10
keep=""
for v in $(echo "${LIBORTHO_BENCH_VARIANTS:-v1,v2,v3}" | tr , ' '); do
  if [ "$v" != v1 ] && grep -qE "^(FAILED|ERROR) .*(\[$v[]-]|test_${v}_)" "$OUT/test_cuda.log"; then
    echo "$v failed its tests: not timed"
  else
    keep="$keep${keep:+,}$v"
  fi
done
export LIBORTHO_BENCH_VARIANTS=${keep:-v1}
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 -m libortho.eval.bench_kernels --out "$OUT/kernels.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^ " | tail -80
fi
