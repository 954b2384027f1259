#!/usr/bin/env bash
# One device call: build the CUDA extension, then the GPU test files one at a time, each into its own log under $OUT
# as it goes, so that a time limit keeps the logs of the files already done (session 49 lost a call that packed its
# logs only at the end). Usage (repo root, on the GPU machine):
#   bash benchmarks/gpu_tests.sh                                   # every file with GPU tests
#   bash benchmarks/gpu_tests.sh tests/test_cuda_norms.py tests/test_fuse.py
#   BUDGET_S=400 bash benchmarks/gpu_tests.sh ...                   # start no file once 400 s have passed
# Carry .deps (CUTLASS's headers) for the M 65-512 alpha 0 path and its tests. Writes $OUT/card.txt, one
# test-<file>.log per file and $OUT/summary.txt (one line per file, the build time and the total).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-} LIBORTHO_BUILD_DIR=${LIBORTHO_BUILD_DIR:-$PWD/.torch_extensions}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
command -v nvidia-smi > /dev/null || { echo "gpu_tests.sh: no GPU here (nvidia-smi not found); run it on the GPU machine"; exit 2; }
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(tests/test_cuda.py tests/test_cuda_attention.py tests/test_cuda_norms.py
                                 tests/test_cuda_glu.py tests/test_fuse.py tests/test_bench_decode.py
                                 tests/test_attention_step.py tests/test_gptq.py)
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log -1 --format='tree of %h (%s)' 2>/dev/null; git status --short src 2>/dev/null | head -5; } > "$OUT/card.txt"
for whl in .deps/nvidia_cutlass-*.whl; do [ -f "$whl" ] && python3 -m pip install -q --no-deps "$whl" 2>&1 | tail -1; done
python3 -m libortho.cli build-kernels \
  2>&1 | tail -5 | tee -a "$OUT/summary.txt"
echo "build: $(elapsed) s" | tee -a "$OUT/summary.txt"
for f in "${FILES[@]}"; do
  name=$(basename "$f" .py)
  if [ -n "${BUDGET_S:-}" ] && [ "$(elapsed)" -ge "$BUDGET_S" ]; then
    echo "$f: not run (budget of $BUDGET_S s spent)" | tee -a "$OUT/summary.txt"; continue
  fi
  python3 -m pytest -q -p no:cacheprovider --tb=short -rf "$f" > "$OUT/test-$name.log" 2>&1
  echo "$f (rc $?): $(tail -n 1 "$OUT/test-$name.log"), at $(elapsed) s" | tee -a "$OUT/summary.txt"
  grep -E "^(FAILED|ERROR)" "$OUT/test-$name.log" | head -5
done
echo "total: $(elapsed) s" | tee -a "$OUT/summary.txt"
